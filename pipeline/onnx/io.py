"""ONNX model files: the folder convention every stage follows, external data, metadata, op counts.

An ONNX artifact folder holds model.onnx (+ model.onnx.data when the weights are external),
config.json and the tokenizer files copied from upstream, so every folder is self-contained.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, first_line

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
# Protobuf cannot hold more than 2 GB, so bigger models keep their weights in EXTERNAL_DATA_FILE.
# Every ONNX stage saves through save_onnx so that this flows through the whole pipeline; the
# environment variable lowers the threshold so tests can exercise the mechanism on tiny models.
EXTERNAL_DATA_THRESHOLD = int(os.environ.get("PIPELINE_EXTERNAL_DATA_THRESHOLD", 1_800_000_000))
# Files that are the model itself; everything else in an artifact folder is metadata to carry on.
_MODEL_SUFFIXES = (".onnx", ".onnx.data", ".onnx_data", ".safetensors", ".bin", ".pt", ".pth")
_STAGE_FILES = ("manifest.json",)


def model_file(folder: Path) -> Path:
    """The model.onnx inside `folder`; InputError when it is missing."""
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise InputError(f"{folder}: no {MODEL_FILE} in this folder (expected an ONNX stage output)")
    return path


def model_bytes(folder: Path) -> int:
    """Bytes of model.onnx plus its external data files."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.name.startswith(MODEL_FILE))


def has_external_data(folder: Path) -> bool:
    """Whether the model in `folder` keeps its weights in a separate file (or must, by size)."""
    return model_bytes(folder) > 2**31 - 1 or any(
        p.name.startswith(MODEL_FILE) and p.name != MODEL_FILE for p in Path(folder).iterdir()
    )


def save_onnx(model: Any, folder: Path, threshold: int | None = None) -> Path:
    """Save `model` (a ModelProto) as folder/model.onnx, weights external above the threshold."""
    import onnx

    folder = Path(folder)
    path = folder / MODEL_FILE
    for stale in (path, folder / EXTERNAL_DATA_FILE):
        stale.unlink(missing_ok=True)
    limit = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    try:
        size = model.ByteSize()
    except ValueError:  # protobuf refuses to size a >2 GB proto: it must be external
        size = 2**31
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=size > limit,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_FILE,
        size_threshold=1024,
    )
    return path


def copy_metadata(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy config, tokenizer and other small files (not weights, not manifests) to `dst_dir`."""
    copied = []
    dst_dir.mkdir(parents=True, exist_ok=True)
    for item in sorted(Path(src_dir).iterdir()):
        if item.name in _STAGE_FILES or item.name.endswith(_MODEL_SUFFIXES):
            continue
        if item.is_file():
            shutil.copy2(item, dst_dir / item.name)
            copied.append(item.name)
        elif item.is_dir() and not item.name.startswith((".", "_tmp")):
            shutil.copytree(item, dst_dir / item.name, dirs_exist_ok=True)
            copied.append(item.name + "/")
    return copied


def count_ops(model: Any, op_types: Sequence[str]) -> dict[str, int]:
    """How many nodes of each of `op_types` the main graph of `model` (a ModelProto, or the path of
    a model file, whose weights are then not loaded) has."""
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    counts = dict.fromkeys(op_types, 0)
    for node in model.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return counts


def graph_nodes(path: Path) -> dict[str, str]:
    """{node name: op type} of the main graph (weights not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {node.name: node.op_type for node in model.graph.node if node.name}


def read_config(folder: Path) -> dict[str, Any]:
    """config.json beside a model; InputError naming the file when it is missing or unreadable."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{folder}: no config.json beside the model") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable JSON config: {first_line(err)}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object")
    return config


def vocab_size(folder: Path) -> int:
    """config.json `vocab_size` (random parity inputs are drawn below it)."""
    value = read_config(folder).get("vocab_size")
    if not isinstance(value, int) or value <= 0:
        raise InputError(
            f"{Path(folder) / 'config.json'}: vocab_size must be a positive integer, got {value!r}"
        )
    return value
