"""Export stage: Hugging Face model -> ONNX via optimum-onnx, then proven equal to PyTorch."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, field_validator

from pipeline.config import StrictModel
from pipeline.models import TASKS, load_torch_model
from pipeline.onnx_utils import (
    EXTERNAL_DATA_FILE,
    copy_metadata,
    normalise_external_data,
    open_session,
    parity_grid,
)
from pipeline.registry import StageContext, stage


class ParityConfig(StrictModel):
    """How the export is proven equal to PyTorch."""

    atol: float = Field(1e-4, gt=0, description="Largest allowed absolute difference of any output.")
    shapes: list[list[int]] = Field(
        [[1, 8], [3, 37], [2, 128]],
        description="[batch, sequence] input shapes compared; at least 3, so dynamic axes are exercised.",
    )

    @field_validator("shapes")
    @classmethod
    def _check_shapes(cls, value: list[list[int]]) -> list[list[int]]:
        if len(value) < 3:
            raise ValueError(f"expected at least 3 [batch, seq] shapes, got {len(value)}")
        for shape in value:
            if len(shape) != 2 or min(shape) < 1:
                raise ValueError(f"expected [batch, seq] with positive sizes, got {shape}")
        return value


class ExportConfig(StrictModel):
    """Recipe section `export`."""

    opset: int = Field(18, ge=11, le=23, description="ONNX opset version.")
    parity: ParityConfig = Field(default_factory=ParityConfig, description="Parity check vs PyTorch.")


@stage("export", config=ExportConfig, consumes="hf", produces="onnx")
def export(ctx: StageContext) -> dict[str, Any]:
    """Export to ONNX with optimum-onnx and check parity against PyTorch on a shape grid."""
    import onnx
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    config: ExportConfig = ctx.config
    task = ctx.recipe.model.task
    if task == "text-generation":  # one model for prompt and decode steps, with a KV cache
        return _export_decoder(ctx, config)
    model = load_torch_model(ctx.input_dir, task, ctx.recipe.model.trust_remote_code)
    copy_metadata(ctx.input_dir, ctx.output_dir)
    # The same model object is exported and used as the parity reference, so a freshly
    # initialised head (an encoder without one) is identical on both sides.
    with torch.no_grad():
        onnx_export_from_model(
            model,
            output=ctx.output_dir,
            task=TASKS[task][1],
            opset=config.opset,
            do_validation=False,  # our own parity grid below is stricter and never just warns
        )
    model.eval()  # the legacy exporter restores train mode on the module it exported
    path = normalise_external_data(ctx.output_dir)
    session = open_session(path)

    def reference(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            outputs = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        return [outputs[o.name].numpy() for o in session.get_outputs()]

    parity = parity_grid(
        reference,
        session,
        config.parity.shapes,
        config.parity.atol,
        model.config.vocab_size,
        label=f"export parity ({path.name} vs PyTorch)",
    )
    graph = onnx.load(str(path), load_external_data=False).graph
    ctx.log.info(
        "export parity: max |diff| %.2e (atol %g), argmax agreement %.4f on %d shapes",
        parity["max_abs_diff"],
        config.parity.atol,
        parity["argmax_agreement"],
        len(config.parity.shapes),
    )
    return {
        "parity": parity,
        "inputs": [i.name for i in session.get_inputs()],
        "outputs": [o.name for o in session.get_outputs()],
        "nodes": len(graph.node),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "model_bytes": sum(f.stat().st_size for f in ctx.output_dir.glob("model.onnx*")),
        "external_data": (ctx.output_dir / EXTERNAL_DATA_FILE).exists(),
    }


def decoder_parity(config: ExportConfig) -> Any:
    """The decoder parity grid (prompt lengths and past lengths) from the export parity shapes."""
    from pipeline.decoder.parity import DecoderParityConfig

    return DecoderParityConfig.from_export_parity(config.parity.atol, config.parity.shapes)


def _export_decoder(ctx: StageContext, config: ExportConfig) -> dict[str, Any]:
    from pipeline.decoder.export import export_decoder

    return export_decoder(
        ctx.input_dir,
        ctx.output_dir,
        config.opset,
        decoder_parity(config),
        trust_remote_code=ctx.recipe.model.trust_remote_code,
        log=ctx.log,
    )
