"""Adapters stage: LoRA adapters of a decoder, one per label, swapped at run time by ONNX Runtime.

For every label of `adapters.labels` it trains a LoRA adapter (peft, the base frozen) on the
data.train texts of that label, then rewrites the plain export once so the adapted MatMuls take
overridable low-rank inputs (pipeline.onnx.lora) and writes `adapters/<label>.onnx_adapter`. With
no adapter active the model is the base model, bit for bit; with one, ONNX Runtime feeds its
weights per call (`RunOptions.add_active_adapter`), so one session serves them all.

Proofs before anything is published: the rewritten graph without an adapter gives the plain
export's logits exactly, and each adapter under ONNX Runtime matches its PyTorch model within
export.parity.atol (else ParityError). Measured: perplexity of the base and of every adapter on the
data.eval texts of every label (the report's adapter matrix), and the adapters' training curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config.adapters import AdaptersConfig
from pipeline.errors import InputError, ParityError
from pipeline.stages.registry import StageContext, stage

ADAPTERS_DIR = "adapters"
ADAPTERS_INDEX = "adapters.json"
PROBE_TOKENS = 64  # tokens of held-out text in each adapter's parity check


def _texts_by_label(examples: list[Any], labels: list[str], split: str) -> dict[str, list[str]]:
    found = sorted({str(e.label) for e in examples if getattr(e, "label", None) is not None})
    by_label = {label: [e.text for e in examples if getattr(e, "label", None) == label] for label in labels}
    for label, texts in by_label.items():
        if not texts:
            raise InputError(
                f"adapters.labels: no data.{split} text has label {label!r} (labels there: "
                f"{', '.join(found) or 'none'})"
            )
    return by_label


@stage(
    "adapters",
    config=AdaptersConfig,
    consumes="onnx",
    produces="onnx",
    data_splits=("train", "eval"),
    sections=("export.parity",),
)
def adapters(ctx: StageContext) -> dict[str, Any]:
    """Train one LoRA adapter per label and serve them all from the export via ONNX Runtime."""
    import numpy as np
    import onnx

    from pipeline import manifest as mf
    from pipeline.onnx import lora as ort_lora
    from pipeline.onnx.io import copy_metadata, model_file, save_onnx
    from pipeline.onnx.session import open_session
    from pipeline.tasks import load_tokenizer
    from pipeline.tasks.text_generation.perplexity import (
        adapter_perplexity_matrix,
        onnx_logits_fn,
        text_token_ids,
        torch_logits_fn,
    )
    from pipeline.training.lora import adapter_modules, train_lm_adapter

    config: AdaptersConfig = ctx.config
    atol = ctx.sections["export.parity"].atol
    if ctx.reference_hf_dir is None:
        raise InputError("adapters: no PyTorch checkpoint of the exported model to train adapters on")
    tokenizer = load_tokenizer(ctx.input_dir, ctx.model.trust_remote_code)
    train = _texts_by_label(list(ctx.data.get("train")), config.labels, "train")
    held = _texts_by_label(list(ctx.data.get("eval")), config.labels, "eval")
    heldout = {label: text_token_ids(tokenizer, texts, config.eval_tokens) for label, texts in held.items()}
    budget = config.window * config.batch_size * config.steps

    def base_model() -> Any:
        return ctx.task.load_model(
            ctx.reference_hf_dir, trust_remote_code=ctx.model.trust_remote_code
        ).float()

    models: dict[str, Any] = {}
    training: dict[str, Any] = {}
    for label in config.labels:
        model = base_model()
        ids = text_token_ids(tokenizer, train[label], budget)
        _, stats = train_lm_adapter(
            model,
            ids,
            config.lora,
            steps=config.steps,
            lr=config.lr,
            window=config.window,
            batch_size=config.batch_size,
            seed=config.seed,
        )
        models[label] = model
        training[label] = {"train_texts": len(train[label]), "train_tokens": int(ids.size), **stats}
        ctx.log.info(
            "adapters: %s: loss %.4f -> %.4f in %d steps (%.1f s)",
            label,
            stats["loss_first"],
            stats["loss_last"],
            config.steps,
            stats["seconds"],
        )

    source = model_file(ctx.input_dir)
    proto = onnx.load(str(source), load_external_data=True)
    slots = ort_lora.add_lora_inputs(proto, adapter_modules(models[config.labels[0]]))
    save_onnx(proto, ctx.output_dir)
    copy_metadata(ctx.input_dir, ctx.output_dir)
    folder = ctx.output_dir / ADAPTERS_DIR
    folder.mkdir()
    scale = config.lora.alpha / config.lora.r
    files = {
        label: ort_lora.write_adapter(
            folder / f"{label}.onnx_adapter", ort_lora.adapter_tensors(model.state_dict(), slots, scale)
        )
        for label, model in models.items()
    }

    session = ort_lora.AdaptedSession(open_session(ctx.output_dir / "model.onnx"))
    for label, path in files.items():
        session.load(label, path)
    probe = heldout[config.labels[0]][None, :PROBE_TOKENS]
    plain = onnx_logits_fn(open_session(source))(probe)
    if not np.array_equal(onnx_logits_fn(session)(probe), plain):
        raise ParityError("adapters: the rewritten model without an adapter differs from the export")
    parity: dict[str, float] = {}
    for label in config.labels:
        session.activate(label)
        diff = float(np.max(np.abs(onnx_logits_fn(session)(probe) - torch_logits_fn(models[label])(probe))))
        parity[label] = diff
        if diff > atol:
            raise ParityError(
                f"adapters: adapter {label!r} under ONNX Runtime differs from its PyTorch model by "
                f"{diff:.3g} (export.parity.atol {atol})"
            )

    matrix = adapter_perplexity_matrix(session, config.labels, heldout, min(256, ctx.model.max_length))
    for active, scores in matrix.items():
        ctx.log.info("adapters: perplexity with %s: %s", active, scores)

    index = {
        "format": 1,
        "rank_dim": ort_lora.RANK_DIM,
        "scale_folded_into_B": scale,
        "lora": config.lora.model_dump(mode="json"),
        "modules": [slot.module for slot in slots],
        "adapters": [
            {
                "name": label,
                "file": f"{ADAPTERS_DIR}/{path.name}",
                "sha256": mf.sha256_file(path),
                "bytes": path.stat().st_size,
                "parity_max_abs_diff": parity[label],
                "perplexity": matrix[label],
            }
            for label, path in files.items()
        ],
        "base_perplexity": matrix["base"],
    }
    (ctx.output_dir / ADAPTERS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    own_gain = {label: round(1 - matrix[label][label] / matrix["base"][label], 6) for label in config.labels}
    return {
        "adapters": [a["name"] for a in index["adapters"]],
        "slots": len(slots),
        "adapted": training[config.labels[0]]["adapted"],
        "trainable_parameters": training[config.labels[0]]["trainable_parameters"],
        "total_parameters": training[config.labels[0]]["total_parameters"],
        "training": training,
        "parity_max_abs_diff": parity,
        "perplexity": matrix,
        "own_domain_perplexity_gain": own_gain,
        "adapter_bytes": {label: path.stat().st_size for label, path in files.items()},
    }


def read_index(folder: Path) -> dict[str, Any] | None:
    """The adapters.json of an ONNX folder (None when the model has no adapters)."""
    path = Path(folder) / ADAPTERS_INDEX
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
