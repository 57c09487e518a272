"""Export a causal LM with its KV cache through optimum-onnx and prove it equal to PyTorch.

One model.onnx handles the prompt (empty past) and every decode step (past = previous presents), as
optimum's `text-generation-with-past` export lays it out (see pipeline.decoder.io). The parity check
compares logits AND present key/values with the PyTorch model on prompt lengths (no past) and on
decode steps after several past lengths, with left-padded rows; a difference above atol is a
ParityError and nothing is kept.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from pipeline.decoder.parity import DecoderParityConfig
from pipeline.errors import InputError, StageError

OPTIMUM_TASK = "text-generation-with-past"


def export_decoder(
    model_dir: str | Path,
    output_dir: str | Path,
    opset: int = 18,
    parity: DecoderParityConfig | dict[str, Any] | None = None,
    *,
    trust_remote_code: bool = False,
    linear_as_matmul: bool = True,
    log: Any = None,
) -> dict[str, Any]:
    """Export `model_dir` (a HF causal-LM folder) to `output_dir`/model.onnx with past key values.

    `parity`: DecoderParityConfig or its dict (atol, batch_size, prompt_lens, past_lens, step_len).
    `linear_as_matmul`: rewrite Gemm linear layers as MatMul + Add (see pipeline.decoder.graph) so
    INT8 and INT4 quantizers reach them. Returns JSON-serialisable metrics; raises ParityError when
    the export differs from PyTorch, InputError for a folder that is not a causal LM.
    """
    import onnx
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    from pipeline.decoder.graph import gemm_to_matmul, lm_head_is_tied, op_counts
    from pipeline.decoder.io import DecoderIO
    from pipeline.decoder.parity import decoder_parity_grid, torch_reference
    from pipeline.decoder.tiny import random_weights
    from pipeline.models import load_torch_model
    from pipeline.onnx_utils import EXTERNAL_DATA_FILE, copy_metadata, open_session, save_onnx

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    config = parity if isinstance(parity, DecoderParityConfig) else DecoderParityConfig(**(parity or {}))
    model = load_torch_model(model_dir, "text-generation", trust_remote_code)
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise InputError(f"{model_dir}: the model has no language-model head (not a causal LM)")
    started = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="decoder-export-") as scratch:
        try:
            # The tracer's warnings about Python bools are expected (optimum patches the masks).
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                onnx_export_from_model(
                    model, output=scratch, task=OPTIMUM_TASK, opset=opset, do_validation=False
                )
        except Exception as err:  # optimum raises many types; the message is what matters
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StageError(f"export ({OPTIMUM_TASK}) of {model_dir} failed: {text}") from None
        model.eval()  # the legacy exporter restores train mode on the module it exported
        proto = onnx.load(str(Path(scratch) / "model.onnx"), load_external_data=True)
    rewritten = gemm_to_matmul(proto) if linear_as_matmul else 0
    path = save_onnx(proto, output_dir)
    copy_metadata(model_dir, output_dir)
    export_s = time.perf_counter() - started

    session = open_session(path)
    io = DecoderIO.from_session(session, str(path))
    parity_metrics = decoder_parity_grid(
        torch_reference(model, io),
        session,
        config.cases(),
        config.atol,
        model.config.vocab_size,
        label=f"decoder export parity ({path} vs PyTorch)",
    )
    if log is not None:
        log.info(
            "decoder export parity: max |diff| logits %.2e, present %.2e (atol %g), argmax %.4f, %d cases",
            parity_metrics["max_abs_diff_logits"],
            parity_metrics["max_abs_diff_present"],
            config.atol,
            parity_metrics["argmax_agreement"],
            len(parity_metrics["cases"]),
        )
    graph = onnx.load(str(path), load_external_data=False)
    return {
        "task": OPTIMUM_TASK,
        "opset": opset,
        "model_type": model.config.model_type,
        "random_weights": random_weights(model_dir),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "layers": io.layers,
        "kv_heads": io.kv_heads,
        "head_dim": io.head_dim,
        "inputs": list(io.input_names),
        "outputs": list(io.output_names),
        "gemm_rewritten_as_matmul": rewritten,
        "lm_head_tied": lm_head_is_tied(graph),
        "op_counts": {k: v for k, v in sorted(op_counts(graph).items()) if k in _REPORTED_OPS},
        "nodes": len(graph.graph.node),
        "parity": parity_metrics,
        "model_bytes": sum(f.stat().st_size for f in output_dir.glob("model.onnx*")),
        "external_data": (output_dir / EXTERNAL_DATA_FILE).exists(),
        "export_s": round(export_s, 2),
    }


_REPORTED_OPS = ("MatMul", "Gemm", "Gather", "Softmax", "LayerNormalization", "Transpose")
