"""Export stage: Hugging Face model -> ONNX via optimum-onnx, then proven equal to PyTorch.

The task names the exporter task (a decoder is exported with its KV cache: one model for the
prompt and every decode step) and supplies the I/O adapter of the parity grid. The same model
object is exported and used as the parity reference, so a freshly initialised head (an encoder
without one) is identical on both sides. A parity failure is a ParityError: nothing is published.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from pipeline.config.export import ExportConfig
from pipeline.errors import StageError, first_line
from pipeline.stages.registry import StageContext, stage


@stage("export", config=ExportConfig, consumes="hf", produces="onnx")
def export(ctx: StageContext) -> dict[str, Any]:
    """Export to ONNX with optimum-onnx and check parity against PyTorch on a shape grid."""
    import onnx
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    from pipeline.model_source import random_weights
    from pipeline.onnx.io import EXTERNAL_DATA_FILE, copy_metadata, model_bytes, save_onnx
    from pipeline.onnx.parity import parity_grid
    from pipeline.onnx.session import open_session

    config: ExportConfig = ctx.config
    task = ctx.task
    model = task.load_model(ctx.input_dir, trust_remote_code=ctx.model.trust_remote_code, require_head=False)
    task.check_exportable(model, ctx.input_dir)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="export-") as scratch:
        try:
            # The tracer's warnings about Python bools are expected (optimum patches the masks).
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                onnx_export_from_model(
                    model,
                    output=scratch,
                    task=task.optimum_task,
                    opset=config.opset,
                    do_validation=False,  # our own parity grid below is stricter and never just warns
                )
        except Exception as err:  # optimum raises many types; the message is what matters
            raise StageError(
                f"export ({task.optimum_task}) of {ctx.input_dir} failed: {first_line(err)}"
            ) from None
        model.eval()  # the legacy exporter restores train mode on the module it exported
        proto = onnx.load(str(Path(scratch) / "model.onnx"), load_external_data=True)
    rewrites = task.prepare_export(proto)
    path = save_onnx(proto, ctx.output_dir)
    copy_metadata(ctx.input_dir, ctx.output_dir)
    export_s = time.perf_counter() - started

    session = open_session(path)
    parity = parity_grid(
        task.torch_reference(model, session),
        session,
        task.parity_cases(session, config.parity.shapes, model.config.vocab_size, config.parity.past_lens),
        config.parity.atol,
        label=f"export parity ({path.name} vs PyTorch)",
    )
    graph = onnx.load(str(path), load_external_data=False)
    ctx.log.info(
        "export parity: max |diff| %.2e (atol %g), argmax agreement %.4f on %d cases",
        parity["max_abs_diff"],
        config.parity.atol,
        parity["argmax_agreement"],
        len(parity["cases"]),
    )
    return {
        "task": task.optimum_task,
        "opset": config.opset,
        "parity": parity,
        "inputs": [i.name for i in session.get_inputs()],
        "outputs": [o.name for o in session.get_outputs()],
        "nodes": len(graph.graph.node),
        "random_weights": random_weights(ctx.input_dir),
        **rewrites,
        **task.export_facts(model, session, graph),
        "model_bytes": model_bytes(ctx.output_dir),
        "external_data": (ctx.output_dir / EXTERNAL_DATA_FILE).exists(),
        "export_s": round(export_s, 2),
    }
