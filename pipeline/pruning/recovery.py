"""Recovery fine-tuning after pruning, reusing the fine-tune stage's training loop.

Optionally distils from the unpruned reference model (ctx.reference_hf_dir): the teacher's logits
on the same batches, softened by `temperature`, weighted by `alpha` against the task loss
(`pipeline.training.train_model` does the training; the task API does the scoring).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.errors import InputError


class RecoverySession:
    """Train/eval data, tokenizer, teacher and fine-tune settings for one prune stage run."""

    def __init__(
        self,
        config: Any,
        *,
        task: Any,
        max_length: int,
        finetune: Any,
        data: Any,
        input_dir: Path,
        reference_hf_dir: Path | None,
        log: logging.Logger,
    ) -> None:
        from pipeline.config.finetune import FinetuneConfig
        from pipeline.tasks import load_tokenizer

        self.config = config
        self.log = log
        self.task = task
        if not self.task.trainable:
            raise InputError(
                f"prune.recover_epochs: task {self.task.name} cannot be fine-tuned here; "
                "set recover_epochs: 0"
            )
        base = finetune if finetune is not None else FinetuneConfig()
        updates: dict[str, Any] = {"epochs": config.recover_epochs}
        if config.recover_lr is not None:
            updates["lr"] = config.recover_lr
        method = config.recover_method or base.method
        if config.kind == "unstructured" and method == "lora":
            method = "full"  # a merged adapter would refill the pruned zeros
            log.info("prune: an unstructured prune recovers with method full, not the finetune's lora")
        if method != base.method:
            updates["method"] = method
            if config.recover_lr is None:
                updates["lr"] = None  # the finetune's lr was set for its own method: use this one's default
        self.finetune_config = base.model_copy(update=updates)
        self.max_length = self.finetune_config.max_length or max_length
        self.train_examples = list(data.get("train"))[: self.finetune_config.max_train_examples]
        self.eval_examples = list(data.get(data.selection_split()))[: self.finetune_config.max_eval_examples]
        self.labels = data.labels()
        self.input_dir = Path(input_dir)
        self.tokenizer = load_tokenizer(self.input_dir)
        self._eval_encoded = self.task.encode(self.tokenizer, self.eval_examples, self.max_length)
        self.metric_name = self.task.metric_name
        self.reference_hf_dir = reference_hf_dir
        self.teacher = None

    def load_student(self) -> Any:
        """The input checkpoint with its task head (created for the data's labels when missing)."""
        import torch

        torch.manual_seed(self.finetune_config.seed)  # a newly created head's initialisation
        return self.task.load_model(self.input_dir, labels=self.labels).float()

    def load_teacher(self, student: Any) -> None:
        """The unpruned reference model, whose logits the student learns from (distill: true)."""
        if not self.config.distill:
            return
        if self.reference_hf_dir is None:
            raise InputError("prune.distill: no reference (unpruned) model is available to distil from")
        teacher = self.task.load_model(Path(self.reference_hf_dir)).float().eval()
        if self.task.head_suffix is not None and dict(teacher.config.id2label) != dict(
            student.config.id2label
        ):
            theirs, ours = sorted(teacher.config.id2label.values()), sorted(student.config.id2label.values())
            raise InputError(
                f"prune.distill: teacher {self.reference_hf_dir} has labels {theirs}, "
                f"the pruned model {ours}; they must match"
            )
        self.teacher = teacher

    def evaluate(self, model: Any) -> float:
        """The task metric of `model` on the tune split (else eval)."""
        from pipeline.tasks import id2label_of

        model.eval()
        predictions = self.task.run(
            self.task.torch_forward(model),
            self._eval_encoded,
            self.finetune_config.eval_batch_size,
            id2label_of(model.config) if self.task.head_suffix is not None else None,
        )
        return round(float(self.task.score(predictions, self.eval_examples)[self.metric_name]), 6)

    def train(self, model: Any) -> tuple[Any, dict[str, Any]]:
        """Fine-tune `model` for recover_epochs; returns the best epoch's model, metric and history."""
        from pipeline.training import train_model

        result = train_model(
            model,
            self.tokenizer,
            self.task,
            self.train_examples,
            self.eval_examples,
            self.finetune_config,
            self.max_length,
            teacher=self.teacher,
            distill_temperature=self.config.temperature,
            distill_alpha=self.config.alpha,
            log=self.log,
        )
        best = result.model.eval()
        metric = None if result.best_metric is None else round(float(result.best_metric), 6)
        return best, {
            "best_metric": metric,
            "best_epoch": result.best_epoch,
            "history": result.history,
            **result.extra,  # method, lr, trainable parameters (LoRA: adapters and merge check)
        }
