"""Feature extraction: mean pooling over the attention mask (the MiniLM sentence-transformers
config: pooling_mode_mean_tokens), scored by cosine to reference embeddings and a linear probe."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.data.examples import TextExample
from pipeline.tasks.base import Encoded
from pipeline.tasks.encoder import EncoderTask

RELEASE_SNIPPET = """
encoding = tokenizer.encode("A sentence to embed.")
hidden = session.run(None, feeds(encoding))[0][0]            # (tokens, hidden)
mask = np.array(encoding.attention_mask, dtype=np.float32)[:, None]
embedding = (hidden * mask).sum(0) / mask.sum()              # mean pooling
print(embedding.shape)
"""


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean of the token vectors where attention_mask is 1: (batch, seq, hidden) -> (batch, hidden)."""
    mask = np.asarray(attention_mask, dtype=np.float64)[..., None]
    summed = (np.asarray(hidden, dtype=np.float64) * mask).sum(axis=1)
    return (summed / np.clip(mask.sum(axis=1), 1e-9, None)).astype(np.float32)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {a.shape} vs {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.clip(norms, 1e-12, None)


class FeatureExtraction(EncoderTask):
    """Sentence embeddings; metric: linear-probe accuracy (5-fold, LogisticRegression) on labels."""

    name = "feature-extraction"
    optimum_task = "feature-extraction"
    metrics = ("probe_accuracy", "cosine_mean", "cosine_min")
    head_suffix = None
    auto_class = "AutoModel"

    def headline_metric(self, configured: str | None, examples: Sequence[Any]) -> str:
        """validate.metric, else probe_accuracy; cosine_mean to the PyTorch embeddings when the
        eval data has no labels (there is no probe to train)."""
        if configured:
            return configured
        if all(getattr(e, "label", None) is None for e in examples):
            return "cosine_mean"
        return self.metric_name

    def agreement(self, predictions: Any, reference: Any) -> float:
        """Mean cosine of the embeddings to the reference embeddings."""
        return float(cosine_rows(np.asarray(predictions), np.asarray(reference)).mean())

    def release_snippet(self) -> str:
        return RELEASE_SNIPPET

    def encode(
        self, tokenizer, examples: Sequence, max_length: int, label2id: dict[str, int] | None = None
    ) -> Encoded:
        self._require(examples, TextExample, "text")
        if not examples:
            return Encoded({"input_ids": [], "attention_mask": []}, tokenizer.pad_token_id or 0)
        enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
        features = self._features(tokenizer, enc)
        if "attention_mask" not in features:
            features["attention_mask"] = [[1] * len(row) for row in features["input_ids"]]
        return Encoded(features, tokenizer.pad_token_id or 0)

    def predict(self, outputs: Sequence[np.ndarray], encoded: Encoded, id2label: Any = None) -> np.ndarray:
        """Mean-pooled embeddings, (n_examples, hidden) float32."""
        masks = encoded.features["attention_mask"]
        rows, start = [], 0
        for hidden in outputs:
            hidden = np.asarray(hidden)
            if hidden.ndim != 3:
                raise ValueError(
                    f"feature-extraction expects (batch, seq, hidden) outputs, got {hidden.shape}"
                )
            batch, width = hidden.shape[:2]
            mask = np.zeros((batch, width), dtype=np.float32)
            for r in range(batch):
                row = masks[start + r][:width]
                mask[r, : len(row)] = row
            rows.append(mean_pool(hidden, mask))
            start += batch
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(rows, axis=0)

    def score(self, predictions: Any, examples: Sequence, reference: Any = None) -> dict[str, float]:
        """probe_accuracy (if >= 2 labelled classes), and cosine_mean/cosine_min to `reference`."""
        embeddings = np.asarray(predictions, dtype=np.float64)
        if embeddings.shape[0] != len(examples):
            raise ValueError(f"{embeddings.shape[0]} embeddings for {len(examples)} examples")
        metrics: dict[str, float] = {}
        if reference is not None:
            cosine = cosine_rows(embeddings, np.asarray(reference))
            metrics["cosine_mean"] = float(cosine.mean())
            metrics["cosine_min"] = float(cosine.min())
        probe = linear_probe_accuracy(embeddings, [e.label for e in examples])
        if probe is not None:
            metrics["probe_accuracy"] = probe
        return metrics

    def report(self, predictions: Any, examples: Sequence) -> str:
        probe = linear_probe_accuracy(np.asarray(predictions), [e.label for e in examples])
        return "linear probe: no labels" if probe is None else f"linear-probe accuracy (5-fold): {probe:.4f}"


def linear_probe_accuracy(
    embeddings: np.ndarray, labels: Sequence[str | None], folds: int = 5
) -> float | None:
    """Stratified k-fold accuracy of a LogisticRegression on L2-normalised embeddings (seed 0);
    None when fewer than 2 classes have at least 2 labelled examples."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    keep = [i for i, label in enumerate(labels) if label is not None]
    if not keep:
        return None
    y = np.asarray([labels[i] for i in keep])
    classes, counts = np.unique(y, return_counts=True)
    k = min(folds, int(counts.min()))
    if len(classes) < 2 or k < 2:
        return None
    x = np.asarray(embeddings, dtype=np.float64)[keep]
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=0)
    scores = cross_val_score(LogisticRegression(max_iter=2000, C=10.0), x, y, cv=cv)
    return float(scores.mean())
