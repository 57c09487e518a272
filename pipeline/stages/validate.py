"""Validate stage: accuracy and speed of every variant against the PyTorch baseline."""

from __future__ import annotations

from pydantic import Field

from pipeline.config import StrictModel


class LatencyConfig(StrictModel):
    """How latency is measured (same process, interleaved, fixed threads)."""

    batch_sizes: list[int] = Field([1, 8], min_length=1, description="Batch sizes to time.")
    seq_lens: list[int] = Field([64], min_length=1, description="Sequence lengths to time.")
    warmup: int = Field(5, ge=0, description="Untimed runs before timing.")
    iters: int = Field(50, ge=1, description="Timed runs per variant and shape.")
    threads: int = Field(2, ge=1, description="Intra-op threads for PyTorch and ONNX Runtime.")


class ValidateConfig(StrictModel):
    """Recipe section `validate`."""

    latency: LatencyConfig = Field(default_factory=LatencyConfig, description="Speed measurement.")
    providers: list[str] = Field(
        ["CPUExecutionProvider"], description="ONNX Runtime execution providers to validate."
    )
