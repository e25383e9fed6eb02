"""`idprior prune` as stages that hand off through files, and what the stages use: pre-run checks, training, evaluation, metrics, zero-shot, speed benchmark, report."""
