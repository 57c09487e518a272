"""Validation of decoder variants: perplexity, greedy agreement and decode speed vs PyTorch.

`validate_decoder` scores the PyTorch fp32 model and every ONNX variant on the SAME token ids of
held-out text (sliding-window perplexity), runs greedy generation with each variant's KV-cache loop
against transformers' generate() on the same prompts, and times prompt processing and per-token
decoding at a few context lengths, all backends interleaved in one process. When the weights are
random (config.json `pipeline_random_weights`, or the caller says so) the result says
`random_weights: true`: perplexity and agreement then measure the export, not a language model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import InputError


def validate_decoder(
    reference_hf_dir: str | Path,
    variants: dict[str, str | Path],
    texts: Sequence[str],
    *,
    random_weights: bool | None = None,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int = 4096,
    prompts: int = 8,
    new_tokens: int = 16,
    context_lens: Sequence[int] = (32, 128),
    warmup: int = 2,
    iters: int = 10,
    threads: int = 2,
    speed: bool = True,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Perplexity, greedy agreement and speed of each ONNX variant folder vs the PyTorch model.

    `variants`: {name: folder with model.onnx}. `texts`: held-out documents (e.g. the recipe's eval
    split). `window` defaults to the model's context size capped at 256; `stride` to window // 2.
    """
    import torch

    from pipeline.decoder import tiny
    from pipeline.decoder.generate import greedy_agreement, prompts_from_texts
    from pipeline.decoder.perplexity import onnx_logits_fn, perplexity, text_token_ids, torch_logits_fn
    from pipeline.decoder.speed import OnnxBackend, TorchBackend, decode_speed
    from pipeline.models import load_tokenizer, load_torch_model
    from pipeline.onnx_utils import model_file, open_session

    if not variants:
        raise InputError("validate_decoder: no ONNX variants to validate")
    reference_hf_dir = Path(reference_hf_dir)
    torch.set_num_threads(threads)
    model = load_torch_model(reference_hf_dir, "text-generation", trust_remote_code)
    tokenizer = load_tokenizer(reference_hf_dir, trust_remote_code)
    context = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", 256
    )
    window = window or min(int(context), 256)
    stride = stride or max(1, window // 2)
    if window > context:
        raise InputError(f"validate_decoder: window {window} exceeds the model's context size {context}")
    ids = text_token_ids(tokenizer, texts, max_tokens)
    prompt_ids = prompts_from_texts(tokenizer, texts, prompts)
    is_random = tiny.random_weights(reference_hf_dir) if random_weights is None else random_weights

    base = perplexity(torch_logits_fn(model), ids, window, stride)
    sessions = {
        name: open_session(model_file(Path(folder)), threads=threads) for name, folder in variants.items()
    }
    per_variant: dict[str, Any] = {}
    for name, session in sessions.items():
        ppl = perplexity(onnx_logits_fn(session), ids, window, stride)
        per_variant[name] = {
            "perplexity": ppl["perplexity"],
            "perplexity_delta": ppl["perplexity"] - base["perplexity"],
            "perplexity_ratio": ppl["perplexity"] / base["perplexity"],
            "greedy": greedy_agreement(model, session, prompt_ids, new_tokens, label=name),
        }
    result: dict[str, Any] = {
        "random_weights": bool(is_random),
        "text": {"documents": len(texts), "tokens": int(ids.size), "window": window, "stride": stride},
        "pytorch": {"perplexity": base["perplexity"], "tokens_scored": base["tokens_scored"]},
        "variants": per_variant,
    }
    if speed:
        backends: dict[str, Any] = {"pytorch": TorchBackend(model)}
        backends.update({name: OnnxBackend(session) for name, session in sessions.items()})
        lengths = [n for n in context_lens if n < context]
        result["speed"] = decode_speed(
            backends, lengths, vocab_size=model.config.vocab_size, warmup=warmup, iters=iters, threads=threads
        )
    return result
