"""LoRA adapters for `finetune.method: lora`: attach them (peft), count what trains, merge them back.

The adapters go on the encoder's linear layers; the task head (the model's own top-level modules
beside the encoder, e.g. `classifier`) trains in full, since a new head starts from random weights.
peft injects the adapters into the model object itself, so the training loop keeps calling the
model it was given (its forward signature unchanged). After training, `merge()` folds every adapter
into its weight and checks the merged model against the unmerged one on real batches: the saved
checkpoint is a plain transformers model that export, quantize and validate read as any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config.finetune import LoraSettings
from pipeline.errors import InputError, OutputError

# Largest |logit| difference allowed between the adapted model and its merge, relative to the
# largest |logit| (at least 1). Both compute W x + s B A x in fp32 and differ only by rounding:
# measured 5e-7 on a tiny BERT and 7e-5 on MiniLM fine-tuned for WNUT-16 (logits up to ~10). A
# wrong merge (scale, a missed layer) moves logits by 1e-1 and more.
MERGE_RTOL = 1e-4


@dataclass
class LoraHandle:
    """An adapted model: the peft wrapper (for merging) and what it trains."""

    peft_model: Any
    target_modules: list[str]
    head_modules: list[str]
    trainable_parameters: int
    total_parameters: int


def _linear_types() -> tuple[type, ...]:
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def head_modules(model: Any) -> list[str]:
    """The model's top-level modules with weights other than its encoder: the task head."""
    base = getattr(model, "base_model_prefix", "")
    return [
        name
        for name, child in model.named_children()
        if name != base and any(True for _ in child.parameters())
    ]


def default_targets(model: Any) -> list[str]:
    """Full names of every linear layer inside the encoder (never the head's)."""
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or encoder is model:
        raise InputError(
            f"finetune.lora: {type(model).__name__} has no separate encoder to put adapters on; "
            "give finetune.lora.target_modules"
        )
    prefix = model.base_model_prefix
    return [
        f"{prefix}.{name}" for name, module in encoder.named_modules() if isinstance(module, _linear_types())
    ]


def _short(name: str) -> str:
    """'bert.encoder.layer.0.attention.output.dense' -> 'attention.output.dense' (the per-layer name)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1 :]) or name
    return parts[-1]


def attach(model: Any, settings: LoraSettings, *, train_head: bool = True) -> LoraHandle:
    """Freeze `model`, inject adapters (peft) and unfreeze them and (train_head) the task head; in
    place. The adapters' A matrices draw from torch's global generator (the caller has seeded it).
    A causal LM keeps its LM head frozen (train_head False): it is tied to the embeddings."""
    from peft import LoraConfig, get_peft_model

    heads = head_modules(model) if train_head else []
    targets = list(settings.target_modules) if settings.target_modules else default_targets(model)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=heads or None,
        bias="none",
    )
    total = sum(p.numel() for p in model.parameters())
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:  # peft: "Target modules {...} not found in the base model"
        names = sorted({_short(n) for n in default_targets(model)}) if settings.target_modules else []
        raise InputError(
            f"finetune.lora.target_modules: {settings.target_modules} match no linear layer of "
            f"{type(model).__name__} ({error}); its per-layer linear layers are: {', '.join(names)}"
        ) from None
    adapted = sorted({_short(n) for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoraHandle(peft_model, adapted, heads, trainable, total)


def merge(
    handle: LoraHandle, batches: list[dict[str, Any]], forward: Callable[[Any], Callable]
) -> tuple[Any, float]:
    """The plain model with every adapter merged, and the largest |logit| change the merge made on
    `batches`; OutputError when that exceeds MERGE_RTOL of the largest |logit|."""
    import numpy as np

    model = handle.peft_model.base_model.model
    model.eval()
    before = [forward(model)(batch) for batch in batches]
    merged = handle.peft_model.merge_and_unload()
    merged.eval()
    after = [forward(merged)(batch) for batch in batches]
    worst = max((float(np.max(np.abs(a - b))) for a, b in zip(before, after, strict=True)), default=0.0)
    allowed = MERGE_RTOL * max([1.0] + [float(np.max(np.abs(a))) for a in before])
    if worst > allowed:
        raise OutputError(
            f"finetune: merging the LoRA adapters changed the logits by {worst:.3g} (allowed {allowed:.3g})"
        )
    leftover = [n for n, _ in merged.named_parameters() if "lora_" in n or "modules_to_save" in n]
    if leftover:
        raise OutputError(f"finetune: the merged model still holds adapter weights: {leftover[:3]}")
    return merged, worst


def train_lm_adapter(
    model: Any,
    token_ids: Any,
    settings: LoraSettings,
    *,
    steps: int,
    lr: float,
    window: int,
    batch_size: int,
    seed: int = 0,
) -> tuple[LoraHandle, dict[str, Any]]:
    """Train LoRA adapters of a causal LM on next-token prediction over `token_ids`, cut into
    windows of `window` tokens drawn in a seeded random order; the adapters stay unmerged (for an
    adapter file). AdamW with a linear decay; returns the handle and the loss curve."""
    import time

    import numpy as np
    import torch

    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    windows = ids[: ids.size // window * window].reshape(-1, window)
    if len(windows) < batch_size:
        raise InputError(
            f"lora: {ids.size} tokens make {len(windows)} windows of {window}; need at least {batch_size}"
        )
    torch.manual_seed(seed)
    handle = attach(model, settings, train_head=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(steps, 1))
    generator = np.random.default_rng(seed)
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += generator.permutation(len(windows)).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        inputs = torch.from_numpy(windows[batch])
        loss = model(input_ids=inputs, labels=inputs, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(round(float(loss.detach()), 4))
    model.eval()
    seconds = time.perf_counter() - started
    return handle, {
        "steps": steps,
        "windows": len(windows),
        "window": window,
        "batch_size": batch_size,
        "lr": lr,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(steps, 1), 3),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "trainable_parameters": handle.trainable_parameters,
        "total_parameters": handle.total_parameters,
        "adapted": handle.target_modules,
    }


def adapter_modules(model: Any) -> list[str]:
    """Names (as in the plain model) of the modules that carry LoRA adapters."""
    prefix = "base_model.model."
    names = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and module.lora_A:
            names.append(name[len(prefix) :] if name.startswith(prefix) else name)
    return names
