"""Token classification (NER, seqeval) and sequence classification (accuracy, macro-F1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.data.examples import TextExample, TokenExample
from pipeline.errors import InputError
from pipeline.tasks.base import IGNORE_INDEX, Encoded, Task, _labels_list


class TokenClassification(Task):
    """NER: labels on the first sub-word of each word (-100 elsewhere); entity-level seqeval F1."""

    name = "token-classification"
    metric_name = "f1"
    head_suffix = "ForTokenClassification"
    auto_class = "AutoModelForTokenClassification"

    def encode(
        self, tokenizer, examples: Sequence, max_length: int, label2id: dict[str, int] | None = None
    ) -> Encoded:
        if not getattr(tokenizer, "is_fast", False):
            raise InputError(
                f"{type(tokenizer).__name__}: token classification needs a fast tokenizer (word ids)"
            )
        self._require(examples, TokenExample, "token/tag")
        if not examples:
            return Encoded({"input_ids": []}, tokenizer.pad_token_id or 0, [] if label2id else None, [])
        enc = tokenizer(
            [list(e.tokens) for e in examples],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
        )
        word_ids = [enc.word_ids(i) for i in range(len(examples))]
        labels = None
        if label2id is not None:
            labels = []
            for example, ids in zip(examples, word_ids, strict=True):
                row, previous = [], None
                for word in ids:
                    if word is None or word == previous:
                        row.append(IGNORE_INDEX)
                    else:
                        tag = example.tags[word]
                        if tag not in label2id:
                            raise InputError(
                                f"tag {tag!r} is not one of the model's labels ({', '.join(label2id)})"
                            )
                        row.append(label2id[tag])
                    previous = word
                labels.append(row)
        encoded = Encoded(self._features(tokenizer, enc), tokenizer.pad_token_id or 0, labels, word_ids)
        encoded.extra["n_words"] = [len(e.tokens) for e in examples]
        return encoded

    def predict(
        self, outputs: Sequence[np.ndarray], encoded: Encoded, id2label: Any = None
    ) -> list[list[str]]:
        """Tag per word from its first sub-word's logits; words cut by truncation get 'O'."""
        if id2label is None:
            raise ValueError("token-classification predict needs id2label")
        names = _labels_list(id2label)
        assert encoded.word_ids is not None
        predictions: list[list[str]] = []
        for index, logits in self._rows(outputs):
            ids = encoded.word_ids[index]
            n_words = max((w for w in ids if w is not None), default=-1) + 1
            if "n_words" in encoded.extra:
                n_words = max(n_words, encoded.extra["n_words"][index])
            tags = ["O"] * n_words
            seen: set[int] = set()
            best = logits[: len(ids)].argmax(-1)
            for position, word in enumerate(ids):
                if word is not None and word not in seen:
                    seen.add(word)
                    tags[word] = names[int(best[position])]
            predictions.append(tags)
        return predictions

    @staticmethod
    def _align(predictions: Sequence[Sequence[str]], examples: Sequence[TokenExample]) -> tuple[list, list]:
        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
        y_true, y_pred = [], []
        for pred, example in zip(predictions, examples, strict=True):
            pred = list(pred)[: len(example.tags)]
            pred += ["O"] * (len(example.tags) - len(pred))
            y_true.append(list(example.tags))
            y_pred.append(pred)
        return y_true, y_pred

    def score(self, predictions: Any, examples: Sequence, reference: Any = None) -> dict[str, float]:
        from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

        y_true, y_pred = self._align(predictions, examples)
        return {
            "f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
            "precision": float(precision_score(y_true, y_pred, average="micro", zero_division=0)),
            "recall": float(recall_score(y_true, y_pred, average="micro", zero_division=0)),
            "token_accuracy": float(accuracy_score(y_true, y_pred)),
        }

    def report(self, predictions: Any, examples: Sequence) -> str:
        from seqeval.metrics import classification_report

        y_true, y_pred = self._align(predictions, examples)
        return classification_report(y_true, y_pred, digits=4, zero_division=0)


class TextClassification(Task):
    """Sequence classification: accuracy and macro-F1 (scikit-learn)."""

    name = "text-classification"
    metric_name = "accuracy"
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
        names = _labels_list(id2label)
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
