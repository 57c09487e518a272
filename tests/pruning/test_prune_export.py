"""Pruned checkpoints export, fuse and match PyTorch (tiny BERT, optimum export, ORT optimizer)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import pruning_model

from pipeline.tasks import get_task

torch = pytest.importorskip("torch")
pytest.importorskip("optimum.exporters.onnx")

LAYERS, HEADS, HIDDEN, FFN = 2, 4, 32, 40
SHAPES = [[1, 8], [3, 17], [2, 33]]


def _export(folder: Path, out: Path) -> Path:
    from optimum.exporters.onnx import main_export

    main_export(str(folder), output=out, task="token-classification", opset=18, do_validation=False)
    return out / "model.onnx"


def _prune_and_save(src: Path, dst: Path, kind: str) -> object:
    from pipeline.pruning.checkpoint import load_model, save_checkpoint
    from pipeline.pruning.structured import prune_ffn, prune_heads

    model = load_model(src)
    if kind == "ffn":
        prune_ffn(model, FFN // 2)
    elif kind == "heads":
        prune_heads(model, HEADS // 2)
    dst.mkdir()
    save_checkpoint(model, src, dst)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """dense / ffn-50% / heads-50% tiny BERT token classifiers: (torch model, onnx path)."""
    root = tmp_path_factory.mktemp("prune_export")
    src = pruning_model(root / "dense_src")
    result = {}
    for kind in ("dense", "ffn", "heads"):
        model = _prune_and_save(src, root / kind, kind)
        result[kind] = (model, _export(root / kind, root / f"{kind}_onnx"))
    return result


def _reference(model):
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        return {"logits": out.logits.numpy()}

    return run


def _file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob("model.onnx*"))


def test_structured_pruning_shrinks_onnx_file(exported):
    from pipeline.pruning.metrics import count_parameters

    dense_model, dense = exported["dense"]
    dense_bytes = _file_bytes(dense)
    for kind, removed_per_layer in (
        ("ffn", (FFN // 2) * (HIDDEN + 1 + HIDDEN)),  # up rows + biases, down columns
        ("heads", 3 * (HEADS // 2) * 8 * (HIDDEN + 1) + (HEADS // 2) * 8 * HIDDEN),  # Q/K/V rows+bias, O cols
    ):
        model, onnx_path = exported[kind]
        removed = count_parameters(dense_model) - count_parameters(model)
        assert removed == LAYERS * removed_per_layer
        # fp32 weights: the file shrinks by 4 bytes per removed parameter (give or take graph constants)
        shrink = dense_bytes - _file_bytes(onnx_path)
        assert shrink == pytest.approx(4 * removed, abs=1024), kind


@pytest.mark.parametrize("kind", ["dense", "ffn", "heads"])
def test_pruned_export_matches_pytorch(exported, kind):
    from pipeline.onnx.parity import parity_grid
    from pipeline.onnx.session import open_session

    model, onnx_path = exported[kind]
    session = open_session(onnx_path)
    cases = get_task("token-classification").parity_cases(session, SHAPES, model.config.vocab_size)
    result = parity_grid(_reference(model), session, cases, 1e-4)
    assert result["max_abs_diff"] < 1e-4
    assert result["argmax_agreement"] == 1.0


def test_head_pruned_model_fuses_attention_with_pruned_head_count(exported, tmp_path):
    from onnxruntime.transformers.optimizer import optimize_model

    from pipeline.onnx.parity import parity_grid
    from pipeline.onnx.session import open_session
    from pipeline.pruning.structured import attention_shape

    model, onnx_path = exported["heads"]
    heads, attention_hidden = attention_shape(model.config)
    assert (heads, attention_hidden) == (HEADS // 2, HIDDEN // 2)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    optimized = optimize_model(
        str(onnx_path), model_type="bert", num_heads=heads, hidden_size=attention_hidden
    )
    stats = optimized.get_fused_operator_statistics()
    assert stats["Attention"] == LAYERS
    assert stats["SkipLayerNormalization"] == 2 * LAYERS
    attention_heads = [
        attr.i
        for node in optimized.model.graph.node
        if node.op_type == "Attention"
        for attr in node.attribute
        if attr.name == "num_heads"
    ]
    assert attention_heads == [heads] * LAYERS
    fused = tmp_path / "fused.onnx"
    optimized.save_model_to_file(str(fused))
    session = open_session(fused)
    cases = get_task("token-classification").parity_cases(session, SHAPES, model.config.vocab_size)
    result = parity_grid(_reference(model), session, cases, 1e-4)
    assert result["max_abs_diff"] < 1e-4


def test_ffn_pruned_model_still_fully_fuses(exported):
    from onnxruntime.transformers.optimizer import optimize_model

    _, onnx_path = exported["ffn"]
    stats = optimize_model(
        str(onnx_path), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN
    ).get_fused_operator_statistics()
    assert stats["Attention"] == LAYERS
    assert stats["BiasGelu"] == LAYERS
