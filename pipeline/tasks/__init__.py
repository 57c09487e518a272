"""One module per task; `get_task(name)` returns the Task a recipe's `model.task` names.

Every stage asks its task for what differs (see pipeline.tasks.base.Task): the exporter task,
the I/O adapter of the parity grid, the quantization policy, the timing calls, the metrics.
"""

from __future__ import annotations

from pipeline.errors import InputError
from pipeline.tasks.base import (
    IGNORE_INDEX,
    Encoded,
    Forward,
    QuantPolicy,
    Scored,
    Task,
    id2label_of,
    load_tokenizer,
)
from pipeline.tasks.encoder import Evaluator, dummy_inputs, ort_forward
from pipeline.tasks.feature_extraction import FeatureExtraction, cosine_rows, linear_probe_accuracy, mean_pool
from pipeline.tasks.question_answering import QuestionAnswering
from pipeline.tasks.text_classification import TextClassification
from pipeline.tasks.text_generation import TextGeneration
from pipeline.tasks.token_classification import TokenClassification

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (TokenClassification, TextClassification, FeatureExtraction, QuestionAnswering, TextGeneration)
}


def get_task(name: str | Task) -> Task:
    """The Task object for a recipe's `model.task`."""
    if isinstance(name, Task):
        return name
    if name in TASKS:
        return TASKS[name]()
    raise InputError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")


__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "Encoded",
    "Evaluator",
    "FeatureExtraction",
    "Forward",
    "QuantPolicy",
    "QuestionAnswering",
    "Scored",
    "Task",
    "TextClassification",
    "TextGeneration",
    "TokenClassification",
    "cosine_rows",
    "dummy_inputs",
    "get_task",
    "id2label_of",
    "linear_probe_accuracy",
    "load_tokenizer",
    "mean_pool",
    "ort_forward",
]
