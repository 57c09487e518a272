"""ONNX helpers shared by the stages: open a model safely, copy metadata, prove parity on a grid."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError, ParityError

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
    external = size > limit
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_FILE,
        size_threshold=1024,
    )
    return path


def normalise_external_data(folder: Path) -> Path:
    """Re-save folder/model.onnx so its weights follow the pipeline's external-data convention."""
    import onnx

    path = model_file(folder)
    model = onnx.load(str(path), load_external_data=True)
    for extra in Path(folder).glob("*.onnx_data"):
        extra.unlink()
    return save_onnx(model, folder)


def open_session(path: Path, providers: Sequence[str] | None = None, threads: int | None = None) -> Any:
    """Load `path` in an onnxruntime.InferenceSession; a corrupt or non-ONNX file is an InputError.

    `onnx.checker` passing is not enough (DESIGN.md §7): only a real session proves a model loads.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as err:  # ORT raises several unrelated types for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: ONNX Runtime cannot load this model: {first}") from None


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


def dummy_inputs(
    input_names: Sequence[str], batch: int, seq: int, vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random but valid encoder inputs; every other row is right-padded so masks are exercised."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low=min(5, vocab_size - 1), high=vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(1, batch, 2):
        keep = max(1, seq - (seq // 3))
        mask[row, keep:] = 0
    inputs: dict[str, np.ndarray] = {}
    for name in input_names:
        if name == "input_ids":
            inputs[name] = ids
        elif name == "attention_mask":
            inputs[name] = mask
        elif name == "token_type_ids":
            inputs[name] = np.zeros((batch, seq), dtype=np.int64)
        elif name == "position_ids":
            inputs[name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        else:
            raise InputError(f"dummy_inputs: don't know how to build model input {name!r}")
    return inputs


def parity_grid(
    reference: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
    session: Any,
    shapes: Sequence[Sequence[int]],
    atol: float,
    vocab_size: int,
    *,
    label: str = "ONNX model",
    min_argmax_agreement: float | None = None,
    min_cosine_mean: float | None = None,
    raise_on_atol: bool = True,
) -> dict[str, Any]:
    """Compare `session` with `reference` on each [batch, seq] shape; ParityError when they differ.

    Padded positions are excluded from the comparison (their outputs are unused and legitimately
    differ between implementations). Returns per-shape and overall max |diff|, argmax agreement
    (meaningful for class scores) and the mean and lowest cosine similarity of the output vectors
    (one per token: hidden states or logits) to the reference's (meaningful for embeddings).
    """
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    per_shape = []
    worst, agree_num, agree_den, cosine_min = 0.0, 0, 0, 1.0
    cosine_sum, cosine_count = 0.0, 0
    for index, (batch, seq) in enumerate(shapes):
        inputs = dummy_inputs(input_names, batch, seq, vocab_size, seed=index)
        expected = reference(inputs)
        actual = session.run(output_names, inputs)
        if len(expected) != len(actual):
            raise ParityError(f"{label}: {len(actual)} outputs, reference has {len(expected)}")
        shape_diff = 0.0
        for name, exp, act in zip(output_names, expected, actual, strict=True):
            exp, act = np.asarray(exp, dtype=np.float64), np.asarray(act, dtype=np.float64)
            if exp.shape != act.shape:
                raise ParityError(
                    f"{label}: output {name!r} has shape {act.shape} at input {batch}x{seq}, "
                    f"reference {exp.shape}"
                )
            valid = _valid_positions(inputs.get("attention_mask"), exp.shape)
            diff = np.abs(exp - act)
            if valid is not None:
                diff = diff[valid]
            if not np.all(np.isfinite(act)):
                raise ParityError(f"{label}: output {name!r} has NaN/inf at input {batch}x{seq}")
            shape_diff = max(shape_diff, float(diff.max()) if diff.size else 0.0)
            if exp.ndim >= 2 and exp.shape[-1] > 1:
                same = np.argmax(exp, axis=-1) == np.argmax(act, axis=-1)
                dot = (exp * act).sum(-1)
                norms = np.linalg.norm(exp, axis=-1) * np.linalg.norm(act, axis=-1)
                cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)
                mask = inputs.get("attention_mask")
                if mask is not None and same.shape == mask.shape:  # per-token outputs: skip padding
                    same, cosine = same[mask.astype(bool)], cosine[mask.astype(bool)]
                agree_num += int(same.sum())
                agree_den += int(same.size)
                if cosine.size:
                    cosine_min = min(cosine_min, float(cosine.min()))
                    cosine_sum += float(cosine.sum())
                    cosine_count += int(cosine.size)
        per_shape.append({"batch": batch, "seq": seq, "max_abs_diff": shape_diff})
        worst = max(worst, shape_diff)
    agreement = agree_num / agree_den if agree_den else 1.0
    cosine_mean = cosine_sum / cosine_count if cosine_count else 1.0
    result = {
        "atol": atol,
        "max_abs_diff": worst,
        "argmax_agreement": agreement,
        "cosine_mean": round(cosine_mean, 6),
        "cosine_min": round(cosine_min, 6),
        "shapes": per_shape,
    }
    if raise_on_atol and worst > atol:
        bad = max(per_shape, key=lambda s: s["max_abs_diff"])
        raise ParityError(
            f"{label}: max |diff| {worst:.3g} exceeds atol {atol:g} "
            f"(worst at batch {bad['batch']}, seq {bad['seq']})"
        )
    if min_argmax_agreement is not None and agreement < min_argmax_agreement:
        raise ParityError(
            f"{label}: argmax agreement {agreement:.3f} is below the minimum {min_argmax_agreement:g}"
        )
    if min_cosine_mean is not None and cosine_mean < min_cosine_mean:
        raise ParityError(
            f"{label}: mean output cosine similarity {cosine_mean:.4f} is below the minimum "
            f"{min_cosine_mean:g}"
        )
    return result


def _valid_positions(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """Boolean index of non-padded positions for outputs shaped [batch, seq, ...], else None."""
    if mask is None or len(shape) < 2 or shape[:2] != mask.shape:
        return None
    valid = mask.astype(bool)
    return np.broadcast_to(valid.reshape(valid.shape + (1,) * (len(shape) - 2)), shape)


def count_ops(path: Path, op_types: Sequence[str]) -> dict[str, int]:
    """How many nodes of each of `op_types` the model at `path` has (weights not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = dict.fromkeys(op_types, 0)
    for node in model.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return counts
