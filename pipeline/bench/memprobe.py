"""Peak memory of one candidate, measured in a fresh process (clean numbers: no allocator reuse).

    python -m pipeline.bench.memprobe onnx FOLDER/model.onnx --task token-classification --batch 8 \
        --seq 128 --threads 2 [--provider CPUExecutionProvider] --vocab 30522
    python -m pipeline.bench.memprobe torch HF_FOLDER --task token-classification --batch 8 ...

prints one JSON line: {"start_rss", "peak_rss", "delta_bytes", "method"}: the resident memory the
process gained while loading the model and running its task's timed calls once at the given
shape (a forward; a decoder's prefill and decode step). The runtime's own import is done before
the measurement starts. `measure_peak_memory` runs it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def measure_peak_memory(
    kind: str,
    path: Path,
    *,
    batch: int,
    seq: int,
    threads: int,
    vocab_size: int,
    task: str,
    provider: str = "CPUExecutionProvider",
    timeout_s: float = 600,
) -> dict[str, Any]:
    """Run the probe in a subprocess; RuntimeError with its last stderr line when it fails."""
    command = [
        sys.executable,
        "-m",
        "pipeline.bench.memprobe",
        kind,
        str(path),
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--threads",
        str(threads),
        "--vocab",
        str(vocab_size),
        "--provider",
        provider,
        "--task",
        task,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe for {path} failed (exit {done.returncode}): {last}")
    return json.loads(lines[-1])


def _probe(args: argparse.Namespace) -> dict[str, Any]:
    import importlib
    import json as _json

    from pipeline.bench.memory import PeakRSS
    from pipeline.tasks import get_task

    task = get_task(args.task)
    if args.kind == "onnx":
        import onnxruntime  # noqa: F401  (the runtime's import is not the model's memory)

        from pipeline.onnx.session import open_session

        with PeakRSS() as memory:
            session = open_session(Path(args.path), args.provider, args.threads)
            for call in task.timing_calls(session, args.batch, args.seq, args.vocab).values():
                call()
    else:
        import torch

        torch.set_num_threads(args.threads)
        model_type = _json.loads((Path(args.path) / "config.json").read_text()).get("model_type", "")
        try:  # import the model code before measuring: module imports are not the model's memory
            importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError:
            pass
        with PeakRSS() as memory:
            model = task.load_model(args.path)
            for call in task.timing_calls(model, args.batch, args.seq, args.vocab).values():
                call()
    return {
        "start_rss": memory.start_bytes,
        "peak_rss": memory.peak_bytes,
        "delta_bytes": memory.delta_bytes,
        "method": memory.method,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.memprobe")
    parser.add_argument("kind", choices=["onnx", "torch"])
    parser.add_argument("path")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--provider", default="CPUExecutionProvider")
    parser.add_argument("--task", required=True)
    args = parser.parse_args(argv)
    print(json.dumps(_probe(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
