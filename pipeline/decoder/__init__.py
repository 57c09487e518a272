"""Decoder language models (task text-generation): KV-cache export, parity, quantization, validation.

Public functions (heavy imports happen inside them):
- export_decoder(model_dir, output_dir, opset, parity) -> metrics          (pipeline.decoder.export)
- decoder_fusion_stats(onnx_dir) / optimize_decoder(onnx_dir, out_dir)      (pipeline.decoder.fusion)
- quantize_decoder(onnx_dir, out_dir, mode, block_size, algo, quantize_lm_head) (pipeline.decoder.quantize)
- validate_decoder(reference_hf_dir, variants, texts) -> perplexity, greedy agreement, speed
- perplexity / greedy_agreement / OnnxGreedyGenerator / decode_speed: the building blocks
- decoder_parity_grid(reference, session, cases, atol, vocab_size): parity with and without past
- build_tiny_decoder(folder, arch): offline tiny models for tests and the offline recipe
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "export_decoder": "pipeline.decoder.export",
    "decoder_fusion_stats": "pipeline.decoder.fusion",
    "optimize_decoder": "pipeline.decoder.fusion",
    "quantize_decoder": "pipeline.decoder.quantize",
    "validate_decoder": "pipeline.decoder.validate",
    "perplexity": "pipeline.decoder.perplexity",
    "greedy_agreement": "pipeline.decoder.generate",
    "OnnxGreedyGenerator": "pipeline.decoder.generate",
    "decode_speed": "pipeline.decoder.speed",
    "decoder_parity_grid": "pipeline.decoder.parity",
    "DecoderParityConfig": "pipeline.decoder.parity",
    "DecoderIO": "pipeline.decoder.io",
    "build_tiny_decoder": "pipeline.decoder.tiny",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline.decoder' has no attribute {name!r}")
