"""Inputs checked before the first stage: one line naming the field, exit 2, nothing written."""

from __future__ import annotations

import pytest
import yaml
from helpers import VALIDATE_NER_LABELS, make_ner_examples, tiny_model, write_conll

from pipeline.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    model = tiny_model(root / "model", labels=VALIDATE_NER_LABELS, max_positions=64)
    examples = list(dict.fromkeys(make_ner_examples(60, seed=2)))
    return {
        "model": model,
        "train": write_conll(root / "train.txt", examples[:30]),
        "eval": write_conll(root / "eval.txt", examples[30:]),
        "renamed": write_conll(
            root / "renamed.txt",
            [type(e)(e.tokens, tuple(t.replace("LOC", "location") for t in e.tags)) for e in examples[30:]],
        ),
    }


def _document(setup, **changes):
    document = {
        "name": "pre",
        "model": {"source": str(setup["model"]), "task": "token-classification", "max_length": 32},
        "data": {"train": {"source": str(setup["train"])}, "eval": {"source": str(setup["eval"])}},
        "export": {"opset": 18, "parity": {"atol": 1e-4, "shapes": [[1, 8], [2, 16], [3, 11]]}},
        "variants": {"fp32": [], "int8": [{"quantize": {"mode": "dynamic"}}]},
        "validate": {"latency": {"batch_sizes": [1], "seq_lens": [16], "warmup": 0, "iters": 2}},
    }
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = document
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return document


def _run(setup, tmp_path, capsys, *extra, **changes):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_document(setup, **changes)))
    out = tmp_path / "exported"
    code = main(["run", str(path), "--exported", str(out), *extra])
    return code, capsys.readouterr().err.strip().splitlines(), out


CASES = {
    "missing model folder": ({"model.source": "/nonexistent/model"}, "/nonexistent/model"),
    "missing eval file": (
        {"data.eval": {"source": "/nonexistent/eval.txt"}},
        "data.eval.source: /nonexistent/eval.txt: data file or folder not found",
    ),
    "labels the head lacks": ({"data.eval": "renamed"}, "data.eval: labels 'B-location'"),
    "parity longer than positions": (
        {"export.parity.shapes": [[1, 8], [1, 65], [2, 9]]},
        "export.parity.shapes: a sequence of 65 tokens exceeds the model's max_position_embeddings 64",
    ),
    "timing longer than positions": (
        {"validate.latency.seq_lens": [128]},
        "validate.latency.seq_lens: 128 exceeds the model's max_position_embeddings 64",
    ),
    "tune overlapping eval": ({"data.tune": "eval"}, "data.tune and data.eval share"),
    "static INT8 with no calibration data": (
        {"data.train": None, "variants": {"s": [{"quantize": {"mode": "static"}}]}},
        "variants.s.0.quantize: static calibrates on data.calibration, which this recipe lacks",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_before_anything_is_written(setup, tmp_path, capsys, case):
    changes, expected = CASES[case]
    changes = {
        k: ({"source": str(setup[v])} if isinstance(v, str) and v in setup else v) for k, v in changes.items()
    }
    for extra in ((), ("--until", "export")):  # --until checks everything too
        code, err, out = _run(setup, tmp_path, capsys, *extra, **changes)
        assert code == 2, err
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
        assert not out.exists() or not any(out.rglob("*.onnx")) and not any(out.rglob("manifest.json"))


def test_train_labels_only_matter_when_a_stage_learns_from_them(setup, tmp_path, capsys):
    """Without a fine-tune, train only feeds the calibration draw: its labels are not checked. A
    pruning recovery learns from them with the model's head: then they are."""
    renamed = {"source": str(setup["renamed"])}
    code, err, _ = _run(setup, tmp_path, capsys, "--until", "export", **{"data.train": renamed})
    assert code == 0, err
    prune = [{"prune": {"kind": "ffn", "amount": 0.5, "recover_epochs": 1}}]
    (tmp_path / "b").mkdir()
    code, err, _ = _run(
        setup,
        tmp_path / "b",
        capsys,
        "--until",
        "export",
        **{"data.train": renamed, "variants.pruned": prune},
    )
    assert code == 2 and "data.train: labels 'B-location'" in err[0]


def test_allowed_overlap_is_carried_as_a_note(setup, tmp_path):
    from pipeline.config import recipe_from_dict
    from pipeline.runner import Runner

    document = _document(setup, **{"data.tune": {"source": str(setup["eval"])}, "data.allow_overlap": True})
    runner = Runner(recipe_from_dict(document), exported=tmp_path / "out", until="export")
    runner.run()
    assert any("data.tune and data.eval share" in note and "allowed" in note for note in runner.notes)
