"""Why validation times candidates in turns with untimed settle runs (not a test).

    .venv/bin/python benchmarks/crosstalk_bench.py [ROOT]   # default exported/minilm-ner-wnut16

Times PyTorch eager fp32, ONNX Runtime fp32 and dynamic INT8 on the default recipe's model (b1 and
b8, seq 64, 2 threads) three ways, each in a fresh process: every candidate alone; strictly
alternating (one run per turn); and in turns of 20 runs after 2 untimed ones (what validation and
`pipeline bench` do). Measured here: PyTorch b1 14.3 ms alone, 46.5 ms strictly alternating (ONNX
Runtime's thread pool still spins after its run and takes the cores), 13.9 ms in turns.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "alone": (0, 0),
    "strict alternation": (1, 0),
    "turns of 10 + 2 untimed": (10, 2),
    "turns of 20 + 2 untimed": (20, 2),
}


def measure(root: str, block: int, settle: int) -> None:
    sys.path.insert(0, str(ROOT))
    import onnxruntime as ort
    import torch

    from pipeline.bench import interleaved, summarize
    from pipeline.tasks import dummy_inputs, get_task

    torch.set_num_threads(2)
    task = get_task("token-classification")
    torch_forward = task.torch_forward(task.load_model(f"{root}/fp32/finetune"))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 2, 3
    fp32 = ort.InferenceSession(f"{root}/fp32/export/model.onnx", options, providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(
        f"{root}/int8-dynamic/quantize/model.onnx", options, providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in fp32.get_inputs()]
    for batch in (1, 8):
        x = dummy_inputs(names, batch, 64, 30522)
        calls = {
            "pytorch": lambda x=x: torch_forward(x),
            "ort-fp32": lambda x=x: fp32.run(None, x),
            "ort-int8": lambda x=x: int8.run(None, x),
        }
        if block == 0:  # each alone, one after the other
            p50 = {
                n: summarize(interleaved({n: f}, warmup=10, iters=60)[n], batch)["p50_ms"]
                for n, f in calls.items()
            }
        else:
            times = interleaved(calls, warmup=10, iters=60, block=block, settle=settle)
            p50 = {n: summarize(t, batch)["p50_ms"] for n, t in times.items()}
        cells = ", ".join(f"{n} {v:.2f} ms" for n, v in p50.items())
        print(f"  b{batch}: {cells}; pytorch/int8 {p50['pytorch'] / p50['ort-int8']:.2f}x", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    root = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "exported" / "minilm-ner-wnut16")
    for label, (block, settle) in MODES.items():
        print(label, flush=True)
        subprocess.run([sys.executable, __file__, "--one", root, str(block), str(settle)], check=True)


if __name__ == "__main__":
    main()
