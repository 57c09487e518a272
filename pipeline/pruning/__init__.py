"""Magnitude pruning of Hugging Face transformer models, in PyTorch, before export.

- `unstructured`: zero the smallest |w| of the blocks' Linear weights (global or per layer) to an
  exact sparsity; masks are torch.nn.utils.prune re-parametrisations until made permanent. ONNX
  Runtime gets no speed-up from these zeros (only the gzip size drops).
- `structured`: drop FFN neurons (`prune_ffn`) or attention heads (`prune_heads`) by L1 magnitude,
  uniformly per layer, so that the HF config describes the result and the checkpoint reloads.
- `arch`: where those modules live per architecture (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT;
  GPT-2 for unstructured only); anything else is an InputError naming its model_type.
- `recovery`: fine-tune after pruning with the fine-tune stage's `train_model`, optionally distilling.
- `run`: the prune stage's work (one-shot prune, recovery, save, reload check, metrics).
- `metrics`: parameter counts and `gzip_bytes(*paths)` (the hook for an ONNX `gzip_bytes` metric).

No heavy imports at module level: torch/transformers load inside the functions.
"""

from pipeline.pruning.arch import STRUCTURED_TYPES, UNSTRUCTURED_TYPES, blocks
from pipeline.pruning.metrics import count_parameters, gzip_bytes
from pipeline.pruning.structured import attention_shape, prune_ffn, prune_heads
from pipeline.pruning.unstructured import ORT_NOTE, apply_magnitude_masks, make_permanent, sparsity_report

__all__ = [
    "ORT_NOTE",
    "STRUCTURED_TYPES",
    "UNSTRUCTURED_TYPES",
    "apply_magnitude_masks",
    "attention_shape",
    "blocks",
    "count_parameters",
    "gzip_bytes",
    "make_permanent",
    "prune_ffn",
    "prune_heads",
    "sparsity_report",
]
