"""`python -m pipeline bench RECIPE`: this pipeline side by side with what a user would otherwise
run (PyTorch, torch INT8, plain ONNX Runtime, Optimum), measured in one process (run.py), and the
results files (results.py)."""

from pipeline.peers.results import render_section, summarize_result, write_results
from pipeline.peers.run import optimum_preset, precision_of, run_benchmark

__all__ = [
    "optimum_preset",
    "precision_of",
    "render_section",
    "run_benchmark",
    "summarize_result",
    "write_results",
]
