"""What the encoder tasks share: [batch, seq] inputs, one forward per timed run, the Evaluator.

Encoder models take input_ids / attention_mask (/ token_type_ids, position_ids) of shape
[batch, seq] and return per-token or per-example outputs. Parity feeds random but valid ids with
every other row right-padded (so masks are exercised); per-token outputs are compared on the real
positions only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError, StageError
from pipeline.tasks.base import Scored, Task

TORCH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def dummy_inputs(
    input_names: Sequence[str], batch: int, seq: int, vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random but valid encoder inputs; every other row is right-padded so masks are exercised."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low=min(5, vocab_size - 1), high=vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(1, batch, 2):
        keep = max(1, seq - (seq // 3))
        mask[row, keep:] = 0
    inputs: dict[str, np.ndarray] = {}
    for name in input_names:
        if name == "input_ids":
            inputs[name] = ids
        elif name == "attention_mask":
            inputs[name] = mask
        elif name == "token_type_ids":
            inputs[name] = np.zeros((batch, seq), dtype=np.int64)
        elif name == "position_ids":
            inputs[name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        else:
            raise InputError(f"dummy_inputs: don't know how to build model input {name!r}")
    return inputs


def ort_forward(session: Any, first_only: bool = True) -> Callable[[dict[str, np.ndarray]], Any]:
    """numpy-in forward of a session: feeds the session's inputs (token_type_ids / position_ids
    filled in when the tokenizer does not give them) and returns its first output."""
    names = [i.name for i in session.get_inputs()]
    outputs = [session.get_outputs()[0].name] if first_only else None

    def feeds(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fed = {}
        ids = inputs["input_ids"]
        for name in names:
            if name in inputs:
                fed[name] = inputs[name]
            elif name == "token_type_ids":
                fed[name] = np.zeros_like(ids)
            elif name == "attention_mask":
                fed[name] = np.ones_like(ids)
            elif name == "position_ids":
                fed[name] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
            else:
                raise InputError(f"validate: model input {name!r} is not produced by the tokenizer")
        return fed

    if first_only:
        return lambda inputs: session.run(outputs, feeds(inputs))[0]
    return lambda inputs: session.run(outputs, feeds(inputs))


def is_session(runner: Any) -> bool:
    """An onnxruntime InferenceSession (else a torch module)."""
    return hasattr(runner, "get_inputs") and hasattr(runner, "run")


class EncoderTask(Task):
    """Tasks of encoder models (classification, embeddings, question answering)."""

    def parity_cases(
        self, session: Any, shapes: Sequence[Sequence[int]], vocab_size: int, past_lens: Any = None
    ) -> list[Any]:
        from pipeline.onnx.parity import ParityCase

        names = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        cases = []
        for index, (batch, seq) in enumerate(shapes):
            feeds = dummy_inputs(names, batch, seq, vocab_size, seed=index)
            mask = feeds.get("attention_mask")
            valid = {name: mask for name in outputs} if mask is not None else {}
            cases.append(ParityCase({"batch": batch, "seq": seq}, feeds, valid))
        return cases

    def torch_reference(
        self, model: Any, session: Any
    ) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        import torch

        names = [o.name for o in session.get_outputs()]

        def reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            with torch.no_grad():
                outputs = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
            return {name: outputs[name].numpy() for name in names}

        return reference

    def export_facts(self, model: Any, session: Any, graph: Any) -> dict[str, Any]:
        return {"parameters": int(sum(p.numel() for p in model.parameters()))}

    def quantization_policy(self, proto: Any, config: Any = None) -> Any:
        from pipeline.tasks.base import QuantPolicy

        # Static: MatMul/Gemm (quantizing every op puts Q/DQ on the attention mask, whose -3.4e38
        # then gets a scale of ~1e36: DESIGN.md §7), plus the embedding Gather unless the recipe
        # says no (as small as dynamic, no F1 cost measured). Dynamic: ORT's integer-op set.
        embedding = getattr(config, "quantize_embedding", None)
        static_gather = ["Gather"] if embedding is None or embedding else []
        int4_gather = ["Gather"] if embedding else []
        return QuantPolicy(
            op_types={
                "static": ["MatMul", "Gemm", *static_gather],
                "dynamic": None,
                "weight_only_int4": ["MatMul", *int4_gather],
                "weight_only_int8": ["MatMul", *int4_gather],
            }
        )

    def timing_calls(
        self, runner: Any, batch: int, seq: int, vocab_size: int
    ) -> dict[str, Callable[[], Any]]:
        if is_session(runner):
            forward = ort_forward(runner, first_only=False)
            inputs = dummy_inputs([i.name for i in runner.get_inputs()], batch, seq, vocab_size, seed=0)
        else:
            forward = self.torch_forward(runner)
            inputs = dummy_inputs(TORCH_INPUTS, batch, seq, vocab_size, seed=0)
        return {"": lambda: forward(inputs)}

    def scorer(self, checkpoint: Path, examples: Sequence[Any], **settings: Any) -> Any:
        return EncoderScorer(self, checkpoint, examples, **settings)

    def onnx_scorer(
        self, folder: Path, examples: Sequence[Any], *, max_length: int, trust_remote_code: bool = False
    ) -> OnnxScorer:
        return OnnxScorer(self, folder, examples, max_length=max_length, trust_remote_code=trust_remote_code)


class Evaluator:
    """Runs a forward over the encoded eval set (length-sorted batches) and scores it."""

    def __init__(self, task: Any, encoded: Any, examples: Sequence[Any], id2label: Any, batch_size: int):
        self.task, self.encoded, self.examples = task, encoded, examples
        self.id2label, self.batch_size = id2label, batch_size
        self.lengths = [len(ids) for ids in encoded.features["input_ids"]]
        self.tokenizer: Any = None
        self.order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], i))

    @classmethod
    def for_checkpoint(
        cls,
        task: Any,
        checkpoint: Path,
        examples: Sequence[Any],
        max_length: int,
        batch_size: int,
        trust_remote_code: bool = False,
    ) -> Evaluator:
        """Tokenise `examples` with the checkpoint's tokenizer and labels (kept as .tokenizer)."""
        from pipeline.tasks.base import id2label_of, load_tokenizer

        tokenizer = load_tokenizer(checkpoint, trust_remote_code)
        encoded = task.encode(tokenizer, examples, max_length)
        id2label = id2label_of(checkpoint) if task.head_suffix else None
        evaluator = cls(task, encoded, examples, id2label, batch_size)
        evaluator.tokenizer = tokenizer
        return evaluator

    def outputs(self, forward: Callable[[dict[str, np.ndarray]], np.ndarray], label: str) -> list[np.ndarray]:
        """Per example, in the original order: its output row, per-token outputs cut to its length."""
        from tqdm import tqdm

        rows: list[np.ndarray | None] = [None] * len(self.order)
        starts = range(0, len(self.order), self.batch_size)
        for start in tqdm(starts, desc=f"eval {label}", unit="batch", disable=None, leave=False):
            indices = self.order[start : start + self.batch_size]
            out = np.asarray(forward(self.encoded.batch(indices)))
            if out.shape[0] != len(indices):
                raise StageError(
                    f"validate: {label} returned {out.shape[0]} rows for a batch of {len(indices)}"
                )
            for r, i in enumerate(indices):
                rows[i] = out[r : r + 1, : self.lengths[i]] if out.ndim >= 3 else out[r : r + 1]
        return rows  # type: ignore[return-value]

    def predict(self, forward: Callable[[dict[str, np.ndarray]], np.ndarray], label: str) -> Any:
        return self.task.predict(self.outputs(forward, label), self.encoded, self.id2label)

    def score(self, predictions: Any, reference: Any) -> dict[str, float]:
        return self.task.score(predictions, self.examples, reference=reference)

    def report(self, predictions: Any) -> str:
        try:
            return self.task.report(predictions, self.examples)
        except InputError:
            return ""


class EncoderScorer:
    """The task metric of the PyTorch baseline and of ONNX sessions on the same encoded examples."""

    def __init__(
        self,
        task: EncoderTask,
        checkpoint: Path,
        examples: Sequence[Any],
        *,
        max_length: int,
        batch_size: int,
        trust_remote_code: bool = False,
        generation: Any = None,  # text-generation only
    ) -> None:
        self.task = task
        self.evaluator = Evaluator.for_checkpoint(
            task, checkpoint, examples, max_length, batch_size, trust_remote_code
        )
        self.reference: Any = None
        self.settings: dict[str, Any] = {}
        self.notes: list[str] = []

    def baseline(self, model: Any) -> Scored:
        predictions = self.evaluator.predict(self.task.torch_forward(model), "pytorch")
        self.reference = predictions
        metrics = self.evaluator.score(predictions, reference=predictions)
        return Scored(metrics, None, self.evaluator.report(predictions))

    def variant(self, session: Any, label: str) -> Scored:
        predictions = self.evaluator.predict(ort_forward(session), label)
        metrics = self.evaluator.score(predictions, reference=self.reference)
        agreement = self.task.agreement(predictions, self.reference)
        return Scored(metrics, round(agreement, 6), self.evaluator.report(predictions))


class OnnxScorer:
    """The task's headline metric of ONNX models on one set of examples (a lossy step's tune split):
    `score(model_path)`; the first model scored is the reference that agreement-style metrics
    (embedding cosine) compare with."""

    def __init__(
        self,
        task: EncoderTask,
        folder: Path,
        examples: Sequence[Any],
        *,
        max_length: int,
        trust_remote_code: bool,
    ) -> None:
        self.task = task
        self.evaluator = Evaluator.for_checkpoint(task, folder, examples, max_length, 32, trust_remote_code)
        self.metric_name = task.headline_metric(None, examples)
        self.reference: Any = None  # predictions of the first model scored
        self.reference_metric: float | None = None

    def score(self, model_path: Path) -> float:
        from pipeline.onnx.session import open_session

        predictions = self.evaluator.predict(
            ort_forward(open_session(Path(model_path))), Path(model_path).name
        )
        if self.reference is None:
            self.reference = predictions
        value = float(self.evaluator.score(predictions, reference=self.reference)[self.metric_name])
        if self.reference_metric is None:
            self.reference_metric = value
        return value

    def drop(self, reference: float, value: float) -> float:
        return self.task.metric_drop(self.metric_name, reference, value) or 0.0
