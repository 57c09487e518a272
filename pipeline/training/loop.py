"""The training loop shared by the fine-tune stage and pruning recovery.

`train_model()` trains a model that already carries its task head with AdamW and a linear
warm-up/decay schedule, scores the eval split with the task metric after every epoch, keeps the
best epoch, and can distil from a teacher's logits. Deterministic for a given seed, data and thread
count.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.config.finetune import FinetuneConfig
from pipeline.errors import InputError
from pipeline.training import lora

if TYPE_CHECKING:
    import torch

    from pipeline.tasks import Task


@dataclass
class TrainResult:
    """What `train_model` returns; `model` holds the best epoch's weights, in eval mode."""

    model: Any
    history: list[dict[str, Any]]
    best_epoch: int
    best_metric: float | None
    metric_name: str
    report: str
    train_examples: int
    eval_examples: int
    seconds_per_epoch: float
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """JSON-serialisable summary (the stage's metrics)."""
        return {
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "metric_name": self.metric_name,
            "history": self.history,
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
            "seconds_per_epoch": round(self.seconds_per_epoch, 3),
            **self.extra,
        }


def _no_decay(name: str) -> bool:
    lowered = name.lower()
    return name.endswith(".bias") or "layernorm" in lowered or "layer_norm" in lowered


def _epoch_order(encoded: Any, config: FinetuneConfig, generator: Any) -> list[list[int]]:
    """One epoch's batches (lists of example indices), shuffled by `generator`.

    group_by_length (as transformers' LengthGroupedSampler): shuffle, cut into groups of 50
    batches, sort each group by length, batch it, then shuffle the batch order, so a batch pads to
    a length close to its rows' while the epoch stays random.
    """
    import torch

    size = config.batch_size
    order = torch.randperm(len(encoded), generator=generator).tolist()
    if not config.group_by_length:
        return [order[i : i + size] for i in range(0, len(order), size)]
    lengths = [len(ids) for ids in encoded.features["input_ids"]]
    group = size * 50
    batches = []
    for g in range(0, len(order), group):
        members = sorted(order[g : g + group], key=lambda i: lengths[i], reverse=True)
        batches += [members[i : i + size] for i in range(0, len(members), size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def train_model(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task | str,
    train_examples: Sequence[Any],
    eval_examples: Sequence[Any] | None,
    config: FinetuneConfig,
    max_length: int,
    *,
    teacher: torch.nn.Module | None = None,
    distill_temperature: float = 2.0,
    distill_alpha: float = 0.5,
    log: logging.Logger | None = None,
) -> TrainResult:
    """Train `model` (already carrying its task head) and return it with the best epoch loaded.

    Loss: cross-entropy, or with `teacher`: alpha * KL(student/T || teacher/T) * T^2 + (1 - alpha) * CE.
    Deterministic for a given `config.seed`, data and thread count.
    """
    import random

    import numpy as np
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from pipeline.tasks import get_task, id2label_of

    log = log or logging.getLogger("pipeline.finetune")
    task = get_task(task) if isinstance(task, str) else task
    if not task.trainable:
        raise InputError(f"finetune: task {task.name} has no trainable head here; remove the finetune step")
    train_examples = list(train_examples)
    eval_examples = list(eval_examples or [])
    if not train_examples:
        raise InputError("finetune: the train split is empty")
    if not 0.0 <= distill_alpha <= 1.0 or distill_temperature <= 0:
        raise InputError(
            f"finetune: distill_alpha must be in [0, 1] and distill_temperature > 0, "
            f"got {distill_alpha} and {distill_temperature}"
        )

    label2id = {str(k): int(v) for k, v in model.config.label2id.items()}
    id2label = id2label_of(model.config)
    train_enc = task.encode(tokenizer, train_examples, max_length, label2id=label2id)
    eval_enc = task.encode(tokenizer, eval_examples, max_length) if eval_examples else None

    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    generator = torch.Generator().manual_seed(config.seed)

    import inspect

    accepted = set(inspect.signature(model.forward).parameters)
    total = sum(p.numel() for p in model.parameters())  # before adapters are added
    adapters = lora.attach(model, config.lora) if config.method == "lora" else None
    extra: dict[str, Any] = {
        "method": config.method,
        "lr": config.learning_rate,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_parameters": total,
    }
    if adapters is not None:
        extra.update(
            lora={
                **config.lora.model_dump(),
                "adapted": adapters.target_modules,
                "head": adapters.head_modules,
            },
        )
        log.info(
            "finetune: LoRA r=%d on %s, head %s in full: %d of %d parameters train (%.2f%%)",
            config.lora.r,
            ", ".join(adapters.target_modules),
            ", ".join(adapters.head_modules) or "none",
            extra["trainable_parameters"],
            total,
            100.0 * extra["trainable_parameters"] / total,
        )
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not _no_decay(n)]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and _no_decay(n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    steps_per_epoch = math.ceil(len(train_enc) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps), total_steps
    )
    if teacher is not None:
        teacher.eval()

    history: list[dict[str, Any]] = []
    best_metric: float | None = None
    best_epoch = config.epochs
    best_state: dict[str, torch.Tensor] | None = None
    best_report = ""
    epoch_seconds: list[float] = []
    try:
        for epoch in range(1, config.epochs + 1):
            started = time.perf_counter()
            model.train()
            order = _epoch_order(train_enc, config, generator)
            total_loss, seen = 0.0, 0
            bar = tqdm(
                order,
                desc=f"epoch {epoch}/{config.epochs}",
                unit="batch",
                mininterval=1.0,
                leave=False,
            )
            for indices in bar:
                batch = train_enc.batch(indices, with_labels=True)
                labels = torch.from_numpy(batch.pop("labels"))
                inputs = {k: torch.from_numpy(v) for k, v in batch.items() if k in accepted}
                logits = model(**inputs).logits
                loss = task.loss(logits, labels)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(**inputs).logits
                    kd = task.distill_loss(logits, teacher_logits, labels, distill_temperature)
                    loss = distill_alpha * kd + (1.0 - distill_alpha) * loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                total_loss += float(loss.detach()) * labels.shape[0]
                seen += labels.shape[0]
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", refresh=False)
            bar.close()
            train_seconds = time.perf_counter() - started
            entry: dict[str, Any] = {"epoch": epoch, "train_loss": round(total_loss / max(seen, 1), 6)}
            model.eval()
            if eval_enc is not None and (config.eval_every_epoch or epoch == config.epochs):
                predictions = task.run(task.torch_forward(model), eval_enc, config.eval_batch_size, id2label)
                scores = task.score(predictions, eval_examples)
                entry.update({k: round(v, 6) for k, v in scores.items()})
                metric = scores[task.metric_name]
                if best_metric is None or metric > best_metric:
                    best_metric, best_epoch = metric, epoch
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    best_report = task.report(predictions, eval_examples)
            entry["train_seconds"] = round(train_seconds, 3)
            entry["seconds"] = round(time.perf_counter() - started, 3)
            epoch_seconds.append(time.perf_counter() - started)
            history.append(entry)
            shown = f" {task.metric_name}={entry[task.metric_name]:.4f}" if task.metric_name in entry else ""
            log.info(
                "finetune epoch %d/%d: loss %.4f%s (%.1f s)",
                epoch,
                config.epochs,
                entry["train_loss"],
                shown,
                entry["seconds"],
            )
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if adapters is not None:
        probe = eval_enc if eval_enc is not None else train_enc
        batches = [batch for _, batch in zip(range(4), probe.batches(config.eval_batch_size), strict=False)]
        model, extra["merge_max_abs_diff"] = lora.merge(adapters, batches, task.torch_forward)
    return TrainResult(
        model=model,
        history=history,
        best_epoch=best_epoch,
        best_metric=best_metric,
        metric_name=task.metric_name,
        report=best_report,
        train_examples=len(train_examples),
        eval_examples=len(eval_examples),
        seconds_per_epoch=sum(epoch_seconds) / max(len(epoch_seconds), 1),
        extra=extra,
    )
