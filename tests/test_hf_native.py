"""A pruned folder works where Hugging Face models work: stock transformers loads it with
`trust_remote_code=True` in a process that cannot import idprior, `pipeline(...)` runs it, the
folder has a model card, save_pruned never replaces a folder that holds someone else's files, and
`idprior export --onnx-dir` writes a folder that runs with onnxruntime and a tokenizer alone."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idprior.errors import IdpriorError
from idprior.model.surgery import apply_plan, load_pruned, load_pruned_with_tokenizer, save_pruned
from tiny_decoder_folder import make_tiny_decoder_folder
from tiny_folder import make_tiny_bert_folder
from tiny_models import tiny_bert

# 4 layers each: layer 0 loses a head (a KV group for Llama), layer 1 its attention sub-layer,
# layer 2 some FFN neurons, layer 3 its FFN, so no two layers have the same shape.
PLAN = ["head:0:1", "attn:1", "neuron:2:3", "neuron:2:17", "ffn:3"]
FOLDERS = {  # name: auto class the child loads it with
    "bert": "AutoModelForSequenceClassification",
    "gpt2": "AutoModelForCausalLM",
    "llama": "AutoModelForCausalLM",
}
TEXT = "the film is not very good"
PROMPT = "the plot of this movie"


def _inputs(name: str) -> dict[str, torch.Tensor]:
    """Two rows, the second padded (right for the encoder, left for decoders)."""
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 3], [2, 11, 12, 13, 14, 3, 0, 0]])  # [2, 8]
    mask = torch.ones_like(ids)
    if name == "bert":
        mask[1, 6:] = 0
    else:
        ids[1] = ids[1].roll(2)
        mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _make_folder(root: Path, name: str) -> Path:
    from transformers import AutoTokenizer, BertForSequenceClassification

    if name == "bert":
        dense = make_tiny_bert_folder(root / "dense-bert", num_labels=3, layers=4)
        model = BertForSequenceClassification.from_pretrained(str(dense), attn_implementation="eager").eval()
        torch.manual_seed(0)
        with torch.no_grad():  # the 0.02 default init makes every branch tiny; equality would prove little
            for param in model.parameters():
                param.normal_(0.0, 0.2)
    else:
        dense = make_tiny_decoder_folder(root / f"dense-{name}", family=name)
        model = load_pruned(dense)  # a plain HF folder of a supported family loads too
    apply_plan(model, PLAN)
    plan = {"method": "test", "counts": {"head": 1, "neuron": 2, "attn": 1, "ffn": 1}}
    return save_pruned(model, AutoTokenizer.from_pretrained(str(dense)), root / name, plan=plan)


# The child: no idprior on its path and any attempt to import it fails; stock transformers only.
CHILD = r'''
import importlib.abc, json, sys
class NoIdprior(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "idprior":
            raise ImportError("idprior must not be needed to load a pruned folder")
sys.meta_path.insert(0, NoIdprior())

import torch, transformers
from safetensors.torch import load_file, save_file

root, spec = sys.argv[1], json.loads(sys.argv[2])
out = {"modules": {}}
logits = {}
for name, auto in spec["folders"].items():
    model = getattr(transformers, auto).from_pretrained(f"{root}/{name}", trust_remote_code=True).eval()
    out["modules"][name] = type(model).__module__
    inputs = load_file(f"{root}/inputs-{name}.safetensors")
    with torch.no_grad():
        logits[name] = model(**inputs).logits.contiguous()
save_file(logits, f"{root}/child_logits.safetensors")
classify = transformers.pipeline("text-classification", model=f"{root}/bert", trust_remote_code=True)
out["classify"] = classify(spec["text"])[0]
generate = transformers.pipeline("text-generation", model=f"{root}/llama", trust_remote_code=True)
out["generate"] = generate(spec["prompt"], max_new_tokens=5, do_sample=False, return_full_text=False)[0]["generated_text"]
out["idprior_imported"] = "idprior" in sys.modules
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """Pruned folders, and what a fresh process with stock transformers made of them."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("native")
    for name in FOLDERS:
        _make_folder(root, name)
        save_file(_inputs(name), str(root / f"inputs-{name}.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(root / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    spec = json.dumps({"folders": FOLDERS, "text": TEXT, "prompt": PROMPT})
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), spec], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1200)  # a hang guard; ~20 s on an idle machine
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return root, result, load_file(str(root / "child_logits.safetensors"))


def test_saved_folder_layout(native):
    root = native[0]
    folder = root / "bert"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForSequenceClassification": "modeling_idprior.BertForSequenceClassification",
                                  "AutoModel": "modeling_idprior.BertModel"}
    assert config["architectures"] == ["BertForSequenceClassification"]  # a stock name: load_pruned builds it
    assert [s["n_heads"] for s in config["idprior_layers"]] == [3, 0, 4, 4]
    tree = ast.parse((folder / "modeling_idprior.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"torch", "transformers"}  # standalone: runs where idprior is not installed
    card = (folder / "README.md").read_text()
    assert "| whole attention sub-layers | 1 |" in card and "| 1 | 0 | 0 | 64 |" in card  # layer 1: no attention
    assert "idprior.load_pruned" in card and "trust_remote_code=True" in card and '"text-classification"' in card
    manifest = json.loads((folder / "idprior.json").read_text())
    assert set(manifest["files"]) | {"idprior.json"} == {p.name for p in folder.iterdir()}
    assert json.loads((root / "llama" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_idprior.LlamaForCausalLM"


@pytest.mark.parametrize("name", list(FOLDERS))
def test_stock_transformers_matches_load_pruned(native, name):
    root, result, child_logits = native
    assert not result["idprior_imported"]
    assert result["modules"][name].startswith("transformers_modules.")  # the folder's own modeling file
    model = load_pruned(root / name)
    with torch.no_grad():
        ref = model(**_inputs(name)).logits
    assert child_logits[name].shape == ref.shape
    torch.testing.assert_close(child_logits[name], ref, atol=1e-5, rtol=0)


def test_pipelines_run_the_pruned_models(native):
    root, result, _ = native
    model, tok = load_pruned_with_tokenizer(root / "bert")
    with torch.no_grad():
        probs = model(**tok(TEXT, return_tensors="pt")).logits.softmax(-1)[0]
    assert result["classify"]["label"] == model.config.id2label[int(probs.argmax())]
    assert result["classify"]["score"] == pytest.approx(float(probs.max()), abs=1e-5)

    model, tok = load_pruned_with_tokenizer(root / "llama")  # layer 1 has no attention: the KV-cache stub path
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected.strip() and result["generate"].strip() == expected.strip()


def test_modeling_file_covers_every_supported_family():
    from idprior.arch import supported_model_types
    from idprior.model import remote as hf_modeling

    assert sorted(hf_modeling.FAMILIES) == supported_model_types()


# ---- refusing foreign folders -------------------------------------------------------------------
def test_save_pruned_refuses_a_folder_with_foreign_files(tmp_path):
    model = tiny_bert()
    apply_plan(model, ["head:0:1"])
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my notes")
    with pytest.raises(IdpriorError, match=r"mine holds files idprior did not write \(notes.txt\)") as err:
        save_pruned(model, None, user)
    assert "\n" not in str(err.value) and "move those files away" in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary folder left behind
    assert [p.name for p in user.iterdir()] == ["notes.txt"] and (user / "notes.txt").read_text() == "my notes"

    ours = save_pruned(model, None, tmp_path / "ours")
    save_pruned(model, None, ours)  # a folder save_pruned wrote may be replaced
    (ours / "sub").mkdir()
    (ours / "sub" / "results.csv").write_text("a,b\n")  # ... until someone adds a file to it
    with pytest.raises(IdpriorError, match=r"sub/results.csv"):
        save_pruned(model, None, ours)
    assert (ours / "sub" / "results.csv").is_file() and (ours / "model.safetensors").is_file()

    legacy = save_pruned(model, None, tmp_path / "legacy")  # as written before manifests existed
    for name in ("idprior.json", "README.md", "modeling_idprior.py"):
        (legacy / name).unlink()
    save_pruned(model, None, legacy)
    assert (legacy / "idprior.json").is_file()


def test_exports_refuse_what_they_did_not_write(tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs onnx")
    from idprior.model.export import export_onnx, export_onnx_dir

    model = tiny_bert()
    pruned = save_pruned(model, None, tmp_path / "pruned")
    with pytest.raises(IdpriorError, match="idprior pruned-model folder, not a onnx one"):
        export_onnx_dir(model, None, pruned)  # never replaces the model it exports
    assert (pruned / "model.safetensors").is_file()
    (tmp_path / "notes.onnx").write_text("not a model")
    with pytest.raises(IdpriorError, match="not written by idprior export"):
        export_onnx(model, None, tmp_path / "notes.onnx")
    assert (tmp_path / "notes.onnx").read_text() == "not a model"


# ---- the deployable ONNX folder -----------------------------------------------------------------
def test_onnx_dir_runs_with_onnxruntime_and_a_tokenizer(native, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="idprior export needs onnxruntime")
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    import onnx
    import onnxruntime as ort
    from transformers import AutoConfig, AutoTokenizer

    from idprior.cli.main import main

    out = tmp_path / "onnx"  # the legacy exporter: the dynamo one takes 15 s here and is tested elsewhere
    assert main(["export", str(native[0] / "bert"), "--onnx-dir", str(out), "--quantize", "int8", "--exporter",
                 "legacy"]) == 0
    assert "model_quantized.onnx: max |int8" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model_quantized.onnx", "config.json", "tokenizer.json", "idprior.json"} <= names
    assert AutoConfig.from_pretrained(str(out)).num_labels == 3

    tok = AutoTokenizer.from_pretrained(str(out))  # stock tokenizer + onnxruntime: nothing from idprior
    batch = tok([TEXT, "a great story"], padding=True, return_tensors="np")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {i.name: batch[i.name] for i in session.get_inputs()})[0]
    model = load_pruned(native[0] / "bert")
    with torch.no_grad():
        ref = model(**tok([TEXT, "a great story"], padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(torch.from_numpy(got), ref, atol=1e-4, rtol=0)

    ops = {node.op_type for node in onnx.load(str(out / "model_quantized.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops or "DynamicQuantizeMatMul" in ops
    quantized = ort.InferenceSession(str(out / "model_quantized.onnx"), providers=["CPUExecutionProvider"])
    q = quantized.run(["logits"], {i.name: batch[i.name] for i in quantized.get_inputs()})[0]
    assert q.shape == got.shape and not (q == got).all()

    main(["export", str(native[0] / "bert"), "--onnx-dir", str(out), "--exporter", "legacy"])  # ours: replaced
    assert "model_quantized.onnx" not in {p.name for p in out.iterdir()}


def test_int8_keeps_the_standard_attention_operator(tmp_path):
    """A fused export's opset-23 `Attention` node must survive quantization: ONNX Runtime's
    quantizer would turn it into its own QAttention, which then fails to load."""
    pytest.importorskip("onnxruntime", reason="quantization needs onnxruntime")
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from idprior.model.export import quantize_int8

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 8])  # [B, heads, T, head_dim]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 8])
    weight = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]),
                               helper.make_node("Attention", ["h", "h", "h"], ["y"])], "g", [x], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    onnx.save(model, str(tmp_path / "a.onnx"))
    quantize_int8(tmp_path / "a.onnx", tmp_path / "q.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert "Attention" in ops and "QAttention" not in ops and "MatMulInteger" in ops
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(["y"], {"x": rng.normal(size=(1, 2, 4, 8)).astype(np.float32)})[0].shape == (1, 2, 4, 8)


def test_onnx_dir_loads_in_optimum(native, tmp_path):
    """Skipped unless optimum's ONNX Runtime classes import (no release supports transformers 5 yet)."""
    optimum_ort = pytest.importorskip("optimum.onnxruntime", exc_type=ImportError)
    from transformers import AutoTokenizer

    from idprior.model.export import export_onnx_dir

    model, tok = load_pruned_with_tokenizer(native[0] / "bert")
    out = export_onnx_dir(model, tok, tmp_path / "onnx", exporter="legacy")
    ort_model = optimum_ort.ORTModelForSequenceClassification.from_pretrained(str(out))
    batch = AutoTokenizer.from_pretrained(str(out))([TEXT], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(ort_model(**batch).logits, model(**batch).logits, atol=1e-4, rtol=0)
