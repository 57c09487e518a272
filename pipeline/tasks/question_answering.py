"""Extractive question answering: exported and proven equal to PyTorch; not scored yet (no
offline QA data set ships with the package index)."""

from __future__ import annotations

from pipeline.tasks.encoder import EncoderTask


class QuestionAnswering(EncoderTask):
    """start/end logits per token; export, fusion and quantization work, validation does not."""

    name = "question-answering"
    optimum_task = "question-answering"
    head_suffix = "ForQuestionAnswering"
    auto_class = "AutoModelForQuestionAnswering"
    metrics = ()
    scorable = False
