"""Recipe section `validate`: accuracy on the eval split and interleaved latency vs PyTorch."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import StrictModel, check_provider_names

CPU = "CPUExecutionProvider"


class LatencyConfig(StrictModel):
    """How latency is measured (same process, interleaved, fixed threads)."""

    batch_sizes: list[int] = Field([1, 8], min_length=1, description="Batch sizes to time.")
    seq_lens: list[int] = Field([64], min_length=1, description="Sequence lengths to time.")
    prefill_seq_lens: list[int] | None = Field(
        None,
        description="text-generation: the seq_lens at which the prompt's prefill is timed too (a decode "
        "step after a past of seq tokens is timed at every seq_len). None = all of them. A long "
        "prefill costs 10x a decode step: timing prefill at 128 and decode at 128 and 256 saved most "
        "of SmolLM2's timing time.",
    )
    prefill_iters: int | None = Field(
        None,
        ge=1,
        description="text-generation: timed prefill runs per candidate and shape, where fewer than "
        "`iters` (None = iters). They spread over the same turns as the decode step's runs (smaller "
        "turns), so the prefill sees the same quiet and busy moments. A 128-token prefill of SmolLM2 "
        "costs 10-20 decode steps: at iters 20 it was most of the timing time.",
    )
    warmup: int = Field(
        5, ge=0, description="Untimed runs of each candidate before timing (interleaved too)."
    )
    iters: int = Field(80, ge=1, description="Timed runs per candidate and shape (in turns of `block` runs).")
    threads: int = Field(2, ge=1, description="Intra-op threads for PyTorch and ONNX Runtime.")
    block: int = Field(
        10,
        ge=1,
        description="Consecutive timed runs of one candidate per turn of the round robin. Strict "
        "alternation (1) lets one runtime's still-spinning thread pool slow the next candidate: "
        "measured here, it made PyTorch eager 3x slower at batch 1 and inflated every speed-up. "
        "The turns are also what the speed-ups' confidence intervals resample (iters / block turns).",
    )
    settle: int = Field(
        2,
        ge=0,
        description="Untimed runs that open every turn, absorbing the hand-over from the previous "
        "candidate's threads.",
    )
    confidence: float = Field(
        0.95,
        gt=0.5,
        lt=1,
        description="Confidence level of the speed-up intervals (a bootstrap over the interleaved "
        "turns of the ratio of medians). Speed gates pass only when the interval clears the limit.",
    )
    max_rounds: int = Field(
        3,
        ge=1,
        description="Timing rounds per shape at most: a round in which other processes used the CPU "
        "(more than max_other_cpu), a candidate's turns spread too far (max_turn_spread), or a "
        "candidate came out slower at a smaller batch is timed again; when the last round still saw "
        "other processes' load or an implausible ordering, the shape is marked interfered and its "
        "speed verdicts are inconclusive.",
    )
    max_other_cpu: float = Field(
        0.25,
        ge=0,
        description="CPU time other processes (and the hypervisor's steal) may take while timing, in "
        "cores on average (/proc/stat), before a round counts as disturbed.",
    )
    max_turn_spread: float = Field(
        1.5,
        gt=1,
        description="Largest allowed ratio of a candidate's slowest to its fastest turn median in a "
        "round; above it the round is timed again (up to max_rounds). Still unsteady, the shape is "
        "reported as such and its intervals carry the spread; only other processes' CPU use "
        "(max_other_cpu) or an implausible ordering makes its verdicts inconclusive.",
    )

    @model_validator(mode="after")
    def _prefill_within_seq_lens(self) -> LatencyConfig:
        extra = sorted(set(self.prefill_seq_lens or []) - set(self.seq_lens))
        if extra:
            raise ValueError(f"prefill_seq_lens {extra} are not in seq_lens {self.seq_lens}")
        if self.prefill_iters is not None and self.prefill_iters > self.iters:
            raise ValueError(f"prefill_iters {self.prefill_iters} is more than iters {self.iters}")
        return self

    @field_validator("batch_sizes", "seq_lens")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError(f"expected positive sizes, got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"expected distinct sizes, got {value}")
        return value


class GenerationConfig(StrictModel):
    """text-generation: greedy generation of every variant (its own KV-cache loop) compared with
    transformers' generate() on the same prompts: the first 8..32 tokens of successive eval texts."""

    prompts: int = Field(8, ge=1, description="Number of prompts.")
    new_tokens: int = Field(16, ge=1, description="Tokens generated per prompt.")
    window: int | None = Field(
        None,
        ge=2,
        description="Perplexity window in tokens (stride: half of it). None = the model's context, "
        "at most 256.",
    )


class ValidateConfig(StrictModel):
    """Recipe section `validate`."""

    metric: str | None = Field(
        None,
        description="Headline metric (gates, release pick, chart). Default per task: f1 (entity-level, "
        "seqeval) for token-classification, accuracy for text-classification, probe_accuracy for "
        "feature-extraction (cosine_mean to the PyTorch embeddings when the eval data has no labels).",
    )
    latency: LatencyConfig = Field(default_factory=LatencyConfig, description="Speed measurement.")
    providers: list[str] = Field(
        [CPU],
        description="ONNX Runtime execution providers to validate. CPUExecutionProvider is always "
        "validated (added when missing); others (CUDAExecutionProvider, TensorrtExecutionProvider) "
        "when present on the machine, else reported as not available.",
    )
    allow_provider_fallback: bool = Field(
        False,
        description="Accept a session that asked for a GPU provider but runs on CPU (reported, no "
        "numbers). Off: such a silent fallback fails the run.",
    )
    eval_batch_size: int = Field(32, ge=1, description="Batch size for the accuracy evaluation.")
    max_eval_examples: int | None = Field(
        None, ge=1, description="Evaluate on the first N eval examples only (reduced runs)."
    )
    measure_memory: bool = Field(
        True,
        description="Record the peak RSS of loading each candidate and one inference at the largest shape.",
    )
    generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(),
        description="text-generation: the greedy-agreement check against PyTorch's generate().",
    )

    @field_validator("providers")
    @classmethod
    def _check_providers(cls, value: list[str]) -> list[str]:
        check_provider_names(value)
        ordered = list(dict.fromkeys(value))
        return ordered if CPU in ordered else [CPU, *ordered]
