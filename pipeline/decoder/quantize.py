"""Quantization of KV-cache decoders: dynamic INT8 and weight-only INT4 (MatMulNBits).

The two weights that dominate a small decoder are handled deliberately, not by accident:
- the LM head (vocab x hidden; 31% of GPT-2 small's weights and its largest decode-time MatMul).
  When it is tied to the embedding, optimum exports it as MatMul(h, Transpose(embedding)), which
  no quantizer touches; `quantize_lm_head=True` materialises the transposed weight first (see
  pipeline.decoder.graph.untie_lm_head), `False` excludes the node explicitly, so the choice is the
  same for tied and untied models.
- the token embedding (a Gather): `quantize_embedding=True` quantizes it (INT8: GatherQuant +
  DequantizeLinear; INT4: GatherBlockQuantized, RTN only), False keeps it fp32. GPT-2's position
  embedding table is a Gather too and goes with it.

Default: both kept fp32. Measured (benchmarks/decoder_bench.py --lm-head-study and tiny models
trained on BBC text): quantizing the LM head cost the most quality (INT4 RTN b32 perplexity +0.38% vs
+0.04% with the head fp32 on the trained tiny Llama, greedy agreement with fp32 PyTorch 0.38 vs 0.79;
next-token KL vs fp32 7.8e-3 vs 6.8e-3 on random GPT-2 small), made tied models BIGGER (GPT-2 small
INT4 237 MB vs 212 MB: the untied copy), and gave no decode speed-up that stood out of the noise on
2 shared cores.

INT4 algorithms offered by ONNX Runtime 1.32 without calibration data: RTN (round to nearest,
`DefaultWeightOnlyQuantConfig`, the default) and HQQ (`HQQWeightOnlyQuantConfig`, half-quadratic
optimisation of scales and zero points). GPTQ needs a calibration data reader and is not offered here.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pipeline.decoder.parity import DecoderParityConfig
from pipeline.errors import InputError, StageError

Mode = Literal["int8", "int4"]
Algo = Literal["rtn", "hqq"]
QUANT_OPS = (
    "MatMul",
    "MatMulInteger",
    "DynamicQuantizeLinear",
    "DynamicQuantizeMatMul",
    "MatMulNBits",
    "GatherBlockQuantized",
    "DequantizeLinear",
    "Gather",
    "Gemm",
)


def quantize_decoder(
    onnx_dir: str | Path,
    out_dir: str | Path,
    mode: Mode = "int4",
    block_size: int = 32,
    algo: Algo = "rtn",
    quantize_lm_head: bool = False,
    *,
    quantize_embedding: bool = False,
    accuracy_level: int | None = None,
    symmetric: bool = False,
    per_channel: bool = True,
    reduce_range: bool | None = None,
    parity: DecoderParityConfig | dict[str, Any] | None = None,
    min_argmax_agreement: float | None = None,
) -> dict[str, Any]:
    """Quantize `onnx_dir`/model.onnx into `out_dir`; returns metrics (ops, sizes, parity vs fp32).

    mode int8: quantize_dynamic, MatMul weights int8 per channel (U8S8). mode int4: MatMulNBits with
    `block_size` (power of two >= 16) and `algo` rtn|hqq. The quantized model is loaded in ONNX
    Runtime and compared with its input on the decoder parity grid (report only: quantization error
    is expected), and fails when `min_argmax_agreement` is given and not met, or when no weight was
    quantized at all.
    """
    import onnx

    from pipeline.decoder.graph import (
        embedding_node,
        gemm_to_matmul,
        lm_head_is_tied,
        lm_head_node,
        untie_lm_head,
    )
    from pipeline.decoder.io import DecoderIO
    from pipeline.decoder.parity import decoder_parity_grid, session_reference
    from pipeline.decoder.tiny import random_weights
    from pipeline.onnx_utils import EXTERNAL_DATA_FILE, copy_metadata, model_file, open_session, save_onnx

    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    if mode not in ("int8", "int4"):
        raise InputError(f"quantize_decoder: mode must be int8 or int4, got {mode!r}")
    if algo not in ("rtn", "hqq"):
        raise InputError(f"quantize_decoder: algo must be rtn or hqq, got {algo!r}")
    if mode == "int4" and (block_size < 16 or block_size & (block_size - 1)):
        raise InputError(f"quantize_decoder: block_size must be a power of two >= 16, got {block_size}")
    if mode == "int4" and algo == "hqq" and quantize_embedding:
        raise InputError(
            "quantize_decoder: HQQ cannot quantize the embedding (ONNX Runtime has no "
            "float zero points for GatherBlockQuantized); use algo rtn or quantize_embedding false"
        )
    if mode == "int8" and algo != "rtn":
        raise InputError(f"quantize_decoder: algo {algo!r} only applies to mode int4")
    config = parity if isinstance(parity, DecoderParityConfig) else DecoderParityConfig(**(parity or {}))
    source = model_file(onnx_dir)
    started = time.perf_counter()
    model = onnx.load(str(source), load_external_data=True)
    tied = lm_head_is_tied(model)
    gemms = gemm_to_matmul(model)
    untied = untie_lm_head(model) if quantize_lm_head else False
    head = lm_head_node(model)
    embedding = embedding_node(model)
    excluded = [head.name] if head is not None and not quantize_lm_head and head.name else []
    if quantize_lm_head and (head is None or (tied and not untied)):
        raise StageError(f"quantize_decoder: cannot find a quantizable LM head MatMul in {source}")

    with tempfile.TemporaryDirectory(prefix="decoder-quant-") as scratch:
        work = Path(scratch)
        prepared = work / "prepared.onnx"
        external = model.ByteSize() > 1_800_000_000
        onnx.save_model(model, str(prepared), save_as_external_data=external, location="prepared.onnx.data")
        written = work / "quantized.onnx"
        if mode == "int8":
            settings = _int8(
                prepared, written, quantize_embedding, excluded, per_channel, reduce_range, external
            )
        else:
            settings = _int4(
                prepared, written, block_size, algo, quantize_embedding, excluded, accuracy_level, symmetric
            )
        result = onnx.load(str(written), load_external_data=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = save_onnx(result, out_dir)
    copy_metadata(onnx_dir, out_dir)
    duration = time.perf_counter() - started

    counts = _count_ops(target)
    quantized = counts["MatMulInteger"] + counts["DynamicQuantizeMatMul"] + counts["MatMulNBits"]
    if not quantized:
        raise StageError(
            f"quantize_decoder ({mode}): no MatMul was quantized in {target} "
            f"(op counts {', '.join(f'{k}={v}' for k, v in counts.items() if v)})"
        )
    reference = open_session(source)
    session = open_session(target)
    vocab = DecoderIO.from_session(session, str(target)).vocab_size  # InputError if not a decoder
    parity_metrics = decoder_parity_grid(
        session_reference(reference),
        session,
        config.cases(),
        math.inf,
        vocab or _vocab_size(onnx_dir),
        label=f"quantized decoder ({mode}) {target}",
        min_argmax_agreement=min_argmax_agreement,
        raise_on_atol=False,
    )
    input_bytes = _size(onnx_dir)
    output_bytes = _size(out_dir)
    return {
        "mode": mode,
        "settings": settings,
        "random_weights": random_weights(onnx_dir),
        "lm_head": {
            "node": head.name if head is not None else None,
            "tied_in_export": tied,
            "quantized": quantize_lm_head,
            "untied_for_quantization": untied,
        },
        "embedding": {
            "node": embedding.name if embedding is not None else None,
            "quantized": quantize_embedding,
        },
        "gemm_rewritten_as_matmul": gemms,
        "quantized_ops": counts,
        "parity_vs_fp32": parity_metrics,
        "size_bytes": output_bytes,
        "input_size_bytes": input_bytes,
        "size_ratio": round(output_bytes / input_bytes, 4) if input_bytes else None,
        "external_data": (out_dir / EXTERNAL_DATA_FILE).exists(),
        "duration_s": round(duration, 2),
    }


def _int8(
    source: Path,
    target: Path,
    quantize_embedding: bool,
    excluded: list[str],
    per_channel: bool,
    reduce_range: bool | None,
    external: bool,
) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from pipeline.fingerprint import machine_fingerprint
    from pipeline.quantization.types import default_int8_types

    defaults = default_int8_types(machine_fingerprint())
    reduce = defaults["reduce_range"] if reduce_range is None else reduce_range
    op_types = ["MatMul"] + (["Gather"] if quantize_embedding else [])
    try:
        with _quiet():
            quantize_dynamic(
                str(source),
                str(target),
                op_types_to_quantize=op_types,
                per_channel=per_channel,
                reduce_range=reduce,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded or None,
                use_external_data_format=external,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
            )
    except Exception as err:
        raise StageError(f"quantize_decoder (int8) failed on {source}: {_first_line(err)}") from None
    return {
        "quantizer": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "QInt8",
        "activation_type": "QUInt8",
        "per_channel": per_channel,
        "reduce_range": reduce,
        "reduce_range_reason": defaults["reason"] if reduce_range is None else "set explicitly",
        "op_types": op_types,
        "nodes_excluded": excluded,
    }


def _int4(
    source: Path,
    target: Path,
    block_size: int,
    algo: str,
    quantize_embedding: bool,
    excluded: list[str],
    accuracy_level: int | None,
    symmetric: bool,
) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    op_types = ("MatMul", "Gather") if quantize_embedding else ("MatMul",)
    if algo == "hqq":
        algo_config: Any = HQQWeightOnlyQuantConfig(
            block_size=block_size, bits=4, op_types_to_quantize=op_types
        )
    else:
        algo_config = DefaultWeightOnlyQuantConfig(
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            op_types_to_quantize=op_types,
        )
    try:
        with _quiet():
            model = onnx.load(str(source), load_external_data=True)
            quantizer = MatMulNBitsQuantizer(
                model,
                block_size=block_size,
                is_symmetric=symmetric,
                accuracy_level=accuracy_level,
                nodes_to_exclude=excluded,
                op_types_to_quantize=op_types,
                algo_config=algo_config,
            )
            quantizer.process()
            quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
    except Exception as err:
        raise StageError(f"quantize_decoder (int4, {algo}) failed on {source}: {_first_line(err)}") from None
    return {
        "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "algorithm": algo,
        "bits": 4,
        "block_size": block_size,
        "symmetric": symmetric if algo == "rtn" else False,
        "accuracy_level": accuracy_level,
        "op_types": list(op_types),
        "nodes_excluded": excluded,
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizers print progress and log INFO lines on the root logger: keep them quiet."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(_io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _count_ops(path: Path) -> dict[str, int]:
    from pipeline.onnx_utils import count_ops

    return count_ops(path, QUANT_OPS)


def _vocab_size(folder: Path) -> int:
    from pipeline.decoder.fusion import read_vocab

    return read_vocab(folder)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.name.startswith("model.onnx"))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
