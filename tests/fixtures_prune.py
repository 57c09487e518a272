"""Tiny checkpoints (built from configs, no network) for the pruning tests."""

from __future__ import annotations

from pathlib import Path

WORDS = [
    "the",
    "a",
    "in",
    "of",
    "to",
    "and",
    "is",
    "at",
    "on",
    "new",
    "york",
    "london",
    "paris",
    "john",
    "mary",
    "apple",
    "google",
    "went",
    "lives",
    "works",
    "for",
    "with",
    "today",
    "city",
    "team",
    "game",
    "music",
    "love",
    "this",
    "that",
    "it",
    "was",
    "we",
    "you",
    "#",
    "@",
    "!",
    ".",
    ",",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABELS = ["O", "B-loc", "I-loc", "B-person", "I-person"]


def write_tokenizer(folder: Path) -> None:
    """A tiny WordPiece tokenizer (BertTokenizerFast) saved into `folder`."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = SPECIAL + WORDS + [c for c in letters if c not in WORDS] + [f"##{c}" for c in letters]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True).save_pretrained(folder)


def vocab_size() -> int:
    return len(SPECIAL) + len(WORDS) + 51  # "a" is both a word and a letter


def tiny_config(model_type: str = "bert", **overrides):
    """A small config: hidden 32, 2 layers, 4 heads (head_dim 8), FFN 40."""
    from transformers import AutoConfig

    common = {"vocab_size": vocab_size(), "num_labels": len(LABELS)}
    if model_type == "distilbert":
        kwargs = {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 40, "max_position_embeddings": 64}
    elif model_type == "gpt2":
        kwargs = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}
    else:
        kwargs = {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 40,
            "max_position_embeddings": 66,
        }
    kwargs.update(common)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    config.id2label = dict(enumerate(LABELS))
    config.label2id = {label: i for i, label in enumerate(LABELS)}
    return config


def tiny_checkpoint(
    folder: Path, model_type: str = "bert", head: str = "token", seed: int = 0, **overrides
) -> Path:
    """Save a randomly initialised tiny model (+ tokenizer) to `folder` and return it.

    head: "token" (…ForTokenClassification), "sequence", "base" (AutoModel), "lm" (causal LM).
    """
    import torch
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    cls = {
        "token": AutoModelForTokenClassification,
        "sequence": AutoModelForSequenceClassification,
        "base": AutoModel,
        "lm": AutoModelForCausalLM,
    }[head]
    model = cls.from_config(config)
    # Spread weight magnitudes so that neurons/heads differ clearly in norm.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(1.0 + torch.rand(param.shape[0], 1) * 4)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    return folder


def ner_examples(count: int, seed: int = 0) -> list:
    """Tiny NER sentences over the fixture vocabulary, carrying all five LABELS."""
    import random

    from pipeline.data import TokenExample

    rng = random.Random(seed)
    filler = ["the", "a", "went", "to", "today", "with", "and", "it", "game", "music"]
    places = [("london",), ("paris",), ("new", "york")]
    people = [("john",), ("mary",), ("mary", "john")]
    examples = []
    for _ in range(count):
        tokens: list[str] = []
        tags: list[str] = []
        for _ in range(rng.randint(3, 7)):
            pick = rng.random()
            if pick < 0.2:
                span, kind = rng.choice(places), "loc"
            elif pick < 0.4:
                span, kind = rng.choice(people), "person"
            else:
                tokens.append(rng.choice(filler))
                tags.append("O")
                continue
            tokens.extend(span)
            tags.extend([f"B-{kind}"] + [f"I-{kind}"] * (len(span) - 1))
        examples.append(TokenExample(tuple(tokens), tuple(tags)))
    return examples
