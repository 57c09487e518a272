"""Tiny, deterministic BERT checkpoints and data files for tests (no network, ~100 KB, < 1 s).

    from fixtures_tiny import make_tiny_bert, TINY_WORDS, make_ner_examples
    folder = make_tiny_bert(tmp_path / "m", "token-classification", labels=["B-LOC", "O"])

`task`: "token-classification", "text-classification", "feature-extraction" (a bare BertModel, no
head), or None (same as feature-extraction). `labels` names the head's classes (id2label order);
`num_labels` alone gives LABEL_0.. names. The tokenizer is a BertTokenizerFast over a small vocab:
whole words in TINY_WORDS plus letters and ##letters, so any lowercase ASCII word tokenizes.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_WORDS = [
    "the", "a", "in", "to", "and", "of", "is", "was", "went", "lives", "visited", "likes", "met",
    "paris", "london", "berlin", "rome", "alice", "bob", "carol", "dave", "acme", "globex",
    "good", "great", "fine", "bad", "awful", "poor", "movie", "film", "day", "food", "today",
    "yesterday", "very", "not", "it", "this", "that", "with", "at", "on", "for",
]  # fmt: skip
VOCAB = list(
    dict.fromkeys(  # de-duplicated, order kept
        SPECIALS
        + TINY_WORDS
        + list(string.ascii_lowercase)
        + [f"##{c}" for c in string.ascii_lowercase]
        + list(string.digits)
        + list(".,!?'-#@:")
    )
)

LOCATIONS = ["paris", "london", "berlin", "rome"]
PEOPLE = ["alice", "bob", "carol", "dave"]
FILLER = ["the", "a", "went", "to", "visited", "met", "today", "yesterday", "with", "and", "it", "day"]


def write_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return path


def make_tokenizer(folder: str | Path):
    """A BertTokenizerFast over the tiny vocab, saved into `folder`."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    tokenizer = BertTokenizerFast(
        vocab_file=str(write_vocab(folder)), do_lower_case=True, model_max_length=512
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def tiny_config(**overrides):
    from transformers import BertConfig

    settings = dict(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
        type_vocab_size=2,
        pad_token_id=0,
    )
    settings.update(overrides)
    return BertConfig(**settings)


def make_tiny_bert(
    folder: str | Path,
    task: str | None = "feature-extraction",
    num_labels: int | None = None,
    labels: Sequence[str] | None = None,
    *,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Save a tiny random BERT (+ tokenizer) to `folder` and return it. Same seed, same weights."""
    import torch
    from transformers import BertForSequenceClassification, BertForTokenClassification, BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(**config_overrides)
    if labels is not None:
        labels = list(labels)
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    elif num_labels is not None:
        config.num_labels = num_labels
    torch.manual_seed(seed)
    if task == "token-classification":
        model = BertForTokenClassification(config)
    elif task == "text-classification":
        model = BertForSequenceClassification(config)
    elif task in (None, "feature-extraction"):
        model = BertModel(config)
    else:
        raise ValueError(f"make_tiny_bert: unsupported task {task!r}")
    model.eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    make_tokenizer(folder)
    return folder


# -- data ------------------------------------------------------------------------------------------


def make_ner_examples(count: int, seed: int = 0):
    """TokenExamples where the tag is a function of the word: cities B-LOC, names B-PER, else O."""
    import random

    from pipeline.data import TokenExample

    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        words = rng.sample(FILLER, rng.randint(2, 5))
        for _ in range(rng.randint(1, 2)):
            kind = rng.choice(["LOC", "PER"])
            word = rng.choice(LOCATIONS if kind == "LOC" else PEOPLE)
            words.insert(rng.randint(0, len(words)), f"{word}|{kind}")
        tokens = [w.split("|")[0] for w in words]
        tags = [f"B-{w.split('|')[1]}" if "|" in w else "O" for w in words]
        examples.append(TokenExample(tuple(tokens), tuple(tags)))
    return examples


def make_text_examples(count: int, seed: int = 0):
    """TextExamples labelled by sentiment words: good/great/fine -> pos, bad/awful/poor -> neg."""
    import random

    from pipeline.data import TextExample

    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        label = rng.choice(["neg", "pos"])
        cue = rng.choice(["good", "great", "fine"] if label == "pos" else ["bad", "awful", "poor"])
        words = rng.sample(["the", "movie", "film", "food", "was", "very", "today", "it", "this"], 3)
        words.insert(rng.randint(0, 3), cue)
        examples.append(TextExample(" ".join(words), label))
    return examples


def write_conll(path: str | Path, examples, separator: str = "\t", blank: str = "") -> Path:
    """Write TokenExamples as CoNLL text (`blank` is the sentence separator line, e.g. '\\t')."""
    path = Path(path)
    lines = []
    for example in examples:
        lines += [f"{tok}{separator}{tag}" for tok, tag in zip(example.tokens, example.tags, strict=True)]
        lines.append(blank)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
