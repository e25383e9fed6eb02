"""`idprior validate`: check a config (preset or YAML file, plus overrides) and report every problem at once."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("validate", help="check a config file without running anything", description=__doc__)
    p.add_argument("config", help="preset name under configs/ or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override to check along with the file")
    p.add_argument("--print", dest="show", action="store_true", help="print the resolved config")
    return p


def run(args) -> int:
    from ..config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)  # ConfigError -> every problem, exit 2
    if args.show:
        print(dump_config(cfg), end="")
    print(f"{args.config}: ok")
    return 0
