"""Sequence classification: one label per text; accuracy and macro-F1 (scikit-learn)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.data.examples import TextExample
from pipeline.errors import InputError
from pipeline.tasks.base import Encoded, labels_list
from pipeline.tasks.encoder import EncoderTask

RELEASE_SNIPPET = """
encoding = tokenizer.encode("Shares rose sharply after the company raised its forecast.")
logits = session.run(None, feeds(encoding))[0][0]
print(manifest["labels"][int(logits.argmax())])
"""


class TextClassification(EncoderTask):
    """Sequence classification: accuracy and macro-F1 (scikit-learn)."""

    name = "text-classification"
    optimum_task = "text-classification"
    metrics = ("accuracy", "macro_f1")
    head_suffix = "ForSequenceClassification"
    auto_class = "AutoModelForSequenceClassification"

    def encode(
        self, tokenizer, examples: Sequence, max_length: int, label2id: dict[str, int] | None = None
    ) -> Encoded:
        self._require(examples, TextExample, "text")
        if not examples:
            return Encoded({"input_ids": []}, tokenizer.pad_token_id or 0, [] if label2id else None)
        enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
        labels = None
        if label2id is not None:
            labels = []
            for example in examples:
                if example.label not in label2id:
                    raise InputError(
                        f"label {example.label!r} is not one of the model's labels ({', '.join(label2id)})"
                    )
                labels.append(label2id[example.label])
        return Encoded(self._features(tokenizer, enc), tokenizer.pad_token_id or 0, labels)

    def predict(self, outputs: Sequence[np.ndarray], encoded: Encoded, id2label: Any = None) -> list[str]:
        if id2label is None:
            raise ValueError("text-classification predict needs id2label")
        names = labels_list(id2label)
        return [names[int(np.asarray(row).argmax(-1))] for _, row in self._rows(outputs)]

    @staticmethod
    def _truth(predictions: Sequence[str], examples: Sequence[TextExample]) -> list[str]:
        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
        truth = [e.label for e in examples]
        if any(t is None for t in truth):
            raise InputError("text-classification scoring needs a label on every eval example")
        return truth  # type: ignore[return-value]

    def score(self, predictions: Any, examples: Sequence, reference: Any = None) -> dict[str, float]:
        from sklearn.metrics import accuracy_score, f1_score

        truth = self._truth(predictions, examples)
        return {
            "accuracy": float(accuracy_score(truth, list(predictions))),
            "macro_f1": float(f1_score(truth, list(predictions), average="macro", zero_division=0)),
        }

    def report(self, predictions: Any, examples: Sequence) -> str:
        from sklearn.metrics import classification_report

        truth = self._truth(predictions, examples)
        return classification_report(truth, list(predictions), digits=4, zero_division=0)

    def agreement(self, predictions: Any, reference: Any) -> float:
        """Share of examples whose class equals the reference's."""
        if len(predictions) != len(reference):
            raise ValueError(f"{len(predictions)} predictions vs {len(reference)} reference predictions")
        if not len(predictions):
            return 1.0
        return float(np.mean([p == r for p, r in zip(predictions, reference, strict=True)]))

    def release_snippet(self) -> str:
        return RELEASE_SNIPPET

    def loss(self, logits, labels):
        import torch.nn.functional as F

        return F.cross_entropy(logits, labels)

    def distill_loss(self, student, teacher, labels, temperature):
        import torch.nn.functional as F

        kl = F.kl_div(
            F.log_softmax(student / temperature, dim=-1),
            F.log_softmax(teacher / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        return kl * temperature * temperature
