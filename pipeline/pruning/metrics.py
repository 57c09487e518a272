"""Size metrics for pruned models: parameter counts and gzip-compressed artifact size.

`gzip_bytes` is the hook for any artifact, e.g. `gzip_bytes(onnx_dir / "model.onnx",
onnx_dir / "model.onnx.data")` for an ONNX folder (report it under the metric name `gzip_bytes`).
Unstructured zeros shrink only this number; the raw file size stays the same.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def count_parameters(model: Any) -> int:
    """Number of parameters (a masked weight counts once, as its dense shape)."""
    return int(sum(param.numel() for param in model.parameters()))


def gzip_bytes(*paths: str | Path, level: int = 6) -> int:
    """Size in bytes of the gzip stream (deflate, `level`) of the given files, concatenated.

    Missing paths are skipped (so an optional `model.onnx.data` can be passed unconditionally).
    """
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip container
    size = 0
    for path in paths:
        path = Path(path)
        if not path.is_file():
            continue
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                size += len(compressor.compress(chunk))
    size += len(compressor.flush())
    return size
