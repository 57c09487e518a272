"""The task interface: everything that differs between tasks, behind one set of methods.

A stage never branches on the task name; it asks the task (see `Task`):
- model: `load_model` (the head for the task), `optimum_task` (what the exporter is asked for);
- I/O adapter: `parity_cases` (feeds and the positions that count, for the one parity grid in
  pipeline.onnx.parity), `torch_reference`, `timing_calls` (what one timed run is: a forward for
  encoders, a prefill and a decode step for decoders) and `latency_stats`;
- quantization policy: `quantization_policy` (default op types, nodes kept in float, graph
  preparation) and the fidelity floors a lossy step is held to;
- validation: `scorer` (the task metric on real data, agreement with PyTorch), `metrics` and which
  are lower-is-better, the headline metric;
- release: `release_snippet` (an onnxruntime-only inference example).

Decoding and scoring work on numpy arrays, so the same code scores PyTorch and ONNX Runtime.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config.model import TRAINABLE_TASKS
from pipeline.errors import InputError, first_line

if TYPE_CHECKING:
    import torch

    from pipeline.onnx.parity import ParityCase, Reference

Forward = Callable[[dict[str, np.ndarray]], np.ndarray]
IGNORE_INDEX = -100


@dataclass
class Encoded:
    """Tokenized examples, unpadded; `batches()` pads each batch to its longest row."""

    features: dict[str, list[list[int]]]  # model input name -> one id list per example
    pad_token_id: int = 0
    labels: list[Any] | None = None  # NER: per-token ids (-100 = ignored); classification: one id
    word_ids: list[list[int | None]] | None = None  # NER: word index of every token
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.features.values()))) if self.features else 0

    @property
    def input_names(self) -> list[str]:
        return list(self.features)

    def batch(self, indices: Sequence[int], *, with_labels: bool = False) -> dict[str, np.ndarray]:
        """Rows `indices` padded to their longest row: int64 arrays (plus "labels" if asked)."""
        width = max(len(self.features["input_ids"][i]) for i in indices)
        out: dict[str, np.ndarray] = {}
        for name, rows in self.features.items():
            pad = self.pad_token_id if name == "input_ids" else 0
            array = np.full((len(indices), width), pad, dtype=np.int64)
            for r, i in enumerate(indices):
                array[r, : len(rows[i])] = rows[i]
            out[name] = array
        if with_labels:
            if self.labels is None:
                raise ValueError("these examples were encoded without labels")
            first = self.labels[indices[0]]
            if isinstance(first, list):
                array = np.full((len(indices), width), IGNORE_INDEX, dtype=np.int64)
                for r, i in enumerate(indices):
                    array[r, : len(self.labels[i])] = self.labels[i]
                out["labels"] = array
            else:
                out["labels"] = np.asarray([self.labels[i] for i in indices], dtype=np.int64)
        return out

    def batches(self, batch_size: int, *, with_labels: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive batches in example order."""
        for start in range(0, len(self), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self))), with_labels=with_labels)


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer for a checkpoint (or ONNX) folder; InputError when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise InputError(f"{folder}: cannot load a tokenizer ({first_line(err)[:200]})") from None


def id2label_of(folder_or_config: Any) -> list[str]:
    """Labels in id order from a folder's config.json, a transformers config, or a dict."""
    if isinstance(folder_or_config, (str, Path)):
        path = Path(folder_or_config) / "config.json"
        if not path.is_file():
            raise InputError(f"{path}: not found; cannot read the model's labels")
        mapping = json.loads(path.read_text(encoding="utf-8")).get("id2label") or {}
    elif isinstance(folder_or_config, dict):
        mapping = folder_or_config
    else:
        mapping = getattr(folder_or_config, "id2label", None) or {}
    if not mapping:
        raise InputError(f"{folder_or_config}: config has no id2label; the model has no labelled head")
    return [mapping[k] for k in sorted(mapping, key=int)]


def labels_list(id2label: Any) -> list[str]:
    if isinstance(id2label, dict):
        return [id2label[k] for k in sorted(id2label, key=int)]
    return list(id2label)


@dataclass
class QuantPolicy:
    """What a task asks of quantization: default op types per mode, nodes kept in float, and graph
    surgery before quantizing."""

    op_types: dict[str, list[str] | None] = field(default_factory=dict)  # mode -> op types
    keep_float: list[str] = field(default_factory=list)  # node names never quantized
    notes: dict[str, Any] = field(default_factory=dict)  # what was decided and why (manifest)
    # Graph surgery on the loaded model (weights included) before quantizing; returns whether it
    # changed anything.
    prepare: Callable[[Any], bool] | None = None


@dataclass
class Scored:
    """One candidate's accuracy on the eval split."""

    metrics: dict[str, float]
    agreement: float | None = None  # with the PyTorch baseline's predictions
    report: str = ""  # per-label text report (classification tasks)
    extra: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class; one subclass per task (pipeline.tasks.get_task)."""

    name: str = ""
    optimum_task: str = ""  # the optimum exporter task
    auto_class: str = "AutoModel"
    head_suffix: str | None = None  # e.g. "ForTokenClassification": the checkpoint's head
    metrics: tuple[str, ...] = ()  # what the scorer computes; the first is the default headline
    lower_is_better: tuple[str, ...] = ()
    scorable = True  # validate can score it on labelled data
    fusion_opt_level: int | None = None  # ORT optimizer opt_level when the recipe gives none
    primary_call = ""  # the timed call a speed-up refers to (see timing_calls)

    @property
    def trainable(self) -> bool:
        return self.name in TRAINABLE_TASKS

    @property
    def metric_name(self) -> str:
        """The headline metric of training and validation."""
        return self.metrics[0]

    # -- model -------------------------------------------------------------------------------------

    def load_model(
        self,
        folder: str | Path,
        labels: Sequence[str] | None = None,
        *,
        trust_remote_code: bool = False,
        require_head: bool = True,
    ) -> torch.nn.Module:
        """The torch model in eval mode, weights from safetensors where there are some.

        With `labels`, a missing (or differently labelled) head is created for them (fine-tuning);
        without, the checkpoint must already have the task head unless `require_head` is False
        (the exporter then exports a freshly initialised one, identical on both sides of parity).
        """
        import transformers

        folder = Path(folder)
        config = self._config(folder, trust_remote_code)
        cls = getattr(transformers, self.auto_class)
        archs = list(getattr(config, "architectures", None) or [])
        kwargs: dict[str, Any] = {}
        if self.head_suffix is not None:
            has_head = any(a.endswith(self.head_suffix) for a in archs)
            current = set((getattr(config, "id2label", None) or {}).values())
            if labels is None:
                if not has_head and require_head:
                    raise InputError(
                        f"{folder}: model ({', '.join(archs) or 'unknown architecture'}) has no {self.name} "
                        "head; fine-tune it first (recipe section finetune)"
                    )
            elif not has_head or current != set(labels):
                labels = list(labels)
                kwargs = {
                    "num_labels": len(labels),
                    "id2label": dict(enumerate(labels)),
                    "label2id": {label: i for i, label in enumerate(labels)},
                    "ignore_mismatched_sizes": has_head,
                }
        try:
            model = cls.from_pretrained(
                str(folder),
                use_safetensors=any(folder.glob("*.safetensors")) or None,
                trust_remote_code=trust_remote_code,
                **kwargs,
            )
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise InputError(
                f"{folder}: cannot load the model for {self.name} ({first_line(err)[:200]})"
            ) from None
        return model.eval()

    @staticmethod
    def _config(folder: Path, trust_remote_code: bool = False) -> Any:
        from transformers import AutoConfig

        if not (folder / "config.json").is_file():
            raise InputError(f"{folder}: not a Hugging Face checkpoint (no config.json)")
        try:
            return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as err:
            raise InputError(f"{folder}/config.json: cannot read ({first_line(err)[:200]})") from None

    def check_exportable(self, model: Any, folder: Path) -> None:
        """InputError when `model` cannot be exported for this task (e.g. a decoder without LM head)."""

    # -- export: I/O adapter -----------------------------------------------------------------------

    def prepare_export(self, proto: Any) -> dict[str, Any]:
        """Rewrite the freshly exported graph in place before it is saved; returns what was done."""
        return {}

    def parity_cases(
        self,
        session: Any,
        shapes: Sequence[Sequence[int]],
        vocab_size: int,
        past_lens: Sequence[int] | None = None,
    ) -> list[ParityCase]:
        """The parity grid's cases for `session` at the recipe's [batch, seq] shapes (decoders also
        check a decode step after each of `past_lens`)."""
        raise NotImplementedError

    def torch_reference(self, model: Any, session: Any) -> Reference:
        """{output name: array} of the torch model for a parity case's feeds."""
        raise NotImplementedError

    def export_facts(self, model: Any, session: Any, graph: Any) -> dict[str, Any]:
        """Task-specific facts of the export for its manifest."""
        return {}

    def fuse_attention(
        self,
        proto: Any,
        config: dict[str, Any],
        required: bool | None,
        rotary_in_attention: bool | None = False,
    ) -> dict[str, Any]:
        """The task's own attention fusion on ORT's fused graph `proto`, in place (config: the
        model's config.json; required: the recipe's switch, None = where it applies;
        rotary_in_attention: the attention op rotates q/k itself, with the same tri-state). Returns
        what was done: {"applied": bool, ...}."""
        return {"applied": False, "reason": f"no attention rewrite of its own for {self.name}"}

    def fused_reference(self, proto: Any, reference: Any) -> Any:
        """The parity Reference (outputs of the unfused model) for the fused graph `proto`, in the
        fused model's cache format when its attention rewrite changed it; by default `reference`."""
        return reference

    # -- quantization policy -----------------------------------------------------------------------

    def quantization_policy(self, proto: Any, config: Any = None) -> QuantPolicy:
        """Defaults for quantizing `proto` (an onnx ModelProto, weights not needed) with `config`
        (the quantize step's QuantizeConfig)."""
        return QuantPolicy()

    # -- speed -------------------------------------------------------------------------------------

    def timing_calls(
        self, runner: Any, batch: int, seq: int, vocab_size: int
    ) -> dict[str, Callable[[], Any]]:
        """One timed run per call name ("" = the forward) of a torch model or an ONNX session."""
        raise NotImplementedError

    def timed_calls(
        self, runner: Any, batch: int, seq: int, vocab_size: int, latency: Any
    ) -> dict[str, Callable[[], Any]]:
        """The calls the timing loop runs at one shape under `latency` (validate.latency): by
        default every one of timing_calls."""
        return self.timing_calls(runner, batch, seq, vocab_size)

    def timed_runs(self, seq: int, latency: Any) -> dict[str, int]:
        """{call name: timed runs per candidate} of timed_calls at sequence length `seq`, without
        building them (the timing loop's counts and its progress bar's total)."""
        return {"": latency.iters}

    def timing_batches(self, batch_sizes: Sequence[int]) -> list[int]:
        """The batch sizes this task is timed at."""
        return list(batch_sizes)

    def latency_entry(self, stats: dict[str, dict[str, Any]], batch: int, seq: int) -> dict[str, Any]:
        """The report's latency entry at one shape from each timed call's summary statistics
        (pipeline.bench.summarize): p50/p90/p99 ms and throughput of the primary call."""
        return stats[""]

    # -- validation --------------------------------------------------------------------------------

    def metric_drop(self, metric: str, baseline: float | None, variant: float | None) -> float | None:
        """Quality lost vs the baseline in the metric's units: positive = worse, whatever its direction."""
        if baseline is None or variant is None:
            return None
        drop = variant - baseline if metric in self.lower_is_better else baseline - variant
        return round(float(drop), 6)

    def headline_metric(self, configured: str | None, examples: Sequence[Any]) -> str:
        """validate.metric, else the task's default."""
        return configured or self.metric_name

    def scorer(self, checkpoint: Path, examples: Sequence[Any], **settings: Any) -> Any:
        """The object that scores the PyTorch baseline and each ONNX variant on `examples`."""
        raise NotImplementedError

    def onnx_scorer(
        self, folder: Path, examples: Sequence[Any], *, max_length: int, trust_remote_code: bool = False
    ) -> Any:
        """Scores ONNX models' headline metric on `examples` (None: this task has no such scorer)."""
        return None

    def release_snippet(self) -> str:
        """Python lines that run the released model with onnxruntime + tokenizers only."""
        return ""

    def write_runtime_files(self, folder: Path) -> list[str]:
        """Files a deployment runtime needs beside the model (written into the release bundle)."""
        return []

    # -- training (trainable tasks) ----------------------------------------------------------------

    def encode(self, tokenizer, examples: Sequence, max_length: int, label2id: dict[str, int] | None = None):
        raise NotImplementedError

    def _require(self, examples: Sequence, kind: type, what: str) -> None:
        """InputError naming the first example that is not a `kind` (e.g. NER data fed to a
        text classifier)."""
        for example in examples:
            if not isinstance(example, kind):
                raise InputError(f"{self.name} needs {what} examples, got {type(example).__name__}")

    @staticmethod
    def _features(tokenizer, enc) -> dict[str, list[list[int]]]:
        names = [n for n in tokenizer.model_input_names if n in enc]
        return {name: [list(row) for row in enc[name]] for name in names}

    def torch_forward(self, model: torch.nn.Module) -> Forward:
        """A numpy-in, numpy-out forward of a torch model (its first output: logits / hidden state)."""
        import inspect

        import torch

        accepted = set(inspect.signature(model.forward).parameters)

        def forward(inputs: dict[str, np.ndarray]) -> np.ndarray:
            tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items() if k in accepted}
            with torch.inference_mode():
                output = model(**tensors)
            return output[0].float().cpu().numpy()

        return forward

    def run(self, forward: Forward, encoded: Encoded, batch_size: int = 32, id2label: Any = None) -> Any:
        """Predictions for all examples: `forward` over the batches, then `predict`."""
        outputs = [forward(batch) for batch in encoded.batches(batch_size)]
        return self.predict(outputs, encoded, id2label)

    def check_labels(self, id2label: Any, examples: Sequence, where: str = "eval data") -> None:
        """InputError when the examples carry labels the model's head does not know (e.g. 'negative'
        vs 'NEGATIVE'): scoring would silently count them all wrong."""
        if self.head_suffix is None:
            return
        known = set(labels_list(id2label))
        found: set[str] = set()
        for example in examples:
            found.update(getattr(example, "tags", ()) or ())
            label = getattr(example, "label", None)
            if label is not None:
                found.add(label)
        missing = sorted(found - known)
        if missing:
            raise InputError(
                f"{where}: labels {', '.join(map(repr, missing[:10]))} are not among the model's labels "
                f"({', '.join(sorted(known))}); use data with the model's label names or fine-tune"
            )

    def predict(self, outputs: Sequence[np.ndarray], encoded: Encoded, id2label: Any = None) -> Any:
        raise NotImplementedError

    def score(self, predictions: Any, examples: Sequence, reference: Any = None) -> dict[str, float]:
        raise NotImplementedError

    def report(self, predictions: Any, examples: Sequence) -> str:
        """Human-readable per-label report (text)."""
        return ""

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )

    def distill_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """KL(student/T || teacher/T) * T^2 over the positions that carry a label."""
        import torch.nn.functional as F

        s = student.reshape(-1, student.shape[-1])
        t = teacher.reshape(-1, teacher.shape[-1])
        keep = labels.reshape(-1) != IGNORE_INDEX
        s, t = s[keep], t[keep]
        if s.shape[0] == 0:
            return student.sum() * 0.0
        kl = F.kl_div(
            F.log_softmax(s / temperature, dim=-1),
            F.log_softmax(t / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        return kl * temperature * temperature

    @staticmethod
    def _rows(outputs: Sequence[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        """(example index, that example's output row) over per-batch outputs."""
        index = 0
        for array in outputs:
            array = np.asarray(array)
            for row in array:
                yield index, row
                index += 1
