"""Per-task logic: load the model head, encode examples, decode outputs, score (see base.py).

`get_task(name)` -> a Task for "token-classification", "text-classification" or
"feature-extraction"; "question-answering" and "text-generation" raise InputError (not supported
for fine-tune/scoring yet).
"""

from __future__ import annotations

from pipeline.errors import InputError
from pipeline.tasks.base import IGNORE_INDEX, Encoded, Forward, Task, id2label_of, load_tokenizer
from pipeline.tasks.classification import TextClassification, TokenClassification
from pipeline.tasks.embeddings import FeatureExtraction, cosine_rows, linear_probe_accuracy, mean_pool

TASKS: dict[str, type[Task]] = {
    TokenClassification.name: TokenClassification,
    TextClassification.name: TextClassification,
    FeatureExtraction.name: FeatureExtraction,
}
UNSUPPORTED = ("question-answering", "text-generation")


def get_task(name: str) -> Task:
    """The Task object for a recipe's `model.task`."""
    if isinstance(name, Task):
        return name
    if name in TASKS:
        return TASKS[name]()
    if name in UNSUPPORTED:
        raise InputError(
            f"task {name}: not supported for fine-tune/scoring yet; supported: {', '.join(TASKS)}"
        )
    raise InputError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")


__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "Encoded",
    "FeatureExtraction",
    "Forward",
    "Task",
    "TextClassification",
    "TokenClassification",
    "cosine_rows",
    "get_task",
    "id2label_of",
    "linear_probe_accuracy",
    "load_tokenizer",
    "mean_pool",
]
