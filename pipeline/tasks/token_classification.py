"""Token classification (NER): labels on the first sub-word of each word; entity-level seqeval F1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.data.examples import TokenExample
from pipeline.errors import InputError
from pipeline.tasks.base import IGNORE_INDEX, Encoded, labels_list
from pipeline.tasks.encoder import EncoderTask

RELEASE_SNIPPET = """
words = "Alice flew from Paris to New York".split()
encoding = tokenizer.encode(words, is_pretokenized=True)
logits = session.run(None, feeds(encoding))[0][0]
seen = set()
for position, word in enumerate(encoding.word_ids):
    if word is not None and word not in seen:  # the first sub-word of each word carries its tag
        seen.add(word)
        print(words[word], manifest["labels"][int(logits[position].argmax())])
"""


class TokenClassification(EncoderTask):
    """NER: labels on the first sub-word of each word (-100 elsewhere); entity-level seqeval F1."""

    name = "token-classification"
    optimum_task = "token-classification"
    metrics = ("f1", "precision", "recall", "token_accuracy")
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
        names = labels_list(id2label)
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

    def agreement(self, predictions: Any, reference: Any) -> float:
        """Share of words whose tag equals the reference's."""
        if len(predictions) != len(reference):
            raise ValueError(f"{len(predictions)} predictions vs {len(reference)} reference predictions")
        same = total = 0
        for pred, ref in zip(predictions, reference, strict=True):
            width = max(len(pred), len(ref))
            pred = list(pred) + ["O"] * (width - len(pred))
            ref = list(ref) + ["O"] * (width - len(ref))
            same += sum(p == r for p, r in zip(pred, ref, strict=True))
            total += width
        return same / total if total else 1.0

    def release_snippet(self) -> str:
        return RELEASE_SNIPPET
