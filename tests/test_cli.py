"""CLI exit codes: 0 ok, 2 bad input, 1 stage failure; messages are one line naming the cause."""

from __future__ import annotations

import subprocess
import sys

import yaml
from helpers import export_only_recipe

from pipeline.cli import main


def test_check_good_and_bad(write_recipe, capsys, tiny_ner_model):
    good = write_recipe(export_only_recipe(tiny_ner_model), "good.yaml")
    assert main(["check", str(good)]) == 0
    document = export_only_recipe(tiny_ner_model)
    document["exprot"] = {}
    bad = write_recipe(document, "bad.yaml")
    assert main(["check", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: exprot: unknown key" in err


def test_run_exit_codes(write_recipe, tiny_ner_model, tmp_path, capsys):
    path = write_recipe(export_only_recipe(tiny_ner_model))
    out = str(tmp_path / "out")
    assert main(["run", str(path), "--exported", out]) == 0
    assert main(["run", str(path), "--exported", out, "--set", "export.parity.atol=1e-12"]) == 1
    assert "exceeds atol" in capsys.readouterr().err
    missing = write_recipe(export_only_recipe(tmp_path / "nope"), "missing.yaml")
    assert main(["run", str(missing), "--exported", out]) == 2
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2


def test_second_run_logs_skip(write_recipe, tiny_ner_model, tmp_path):
    path = write_recipe(yaml.safe_dump(export_only_recipe(tiny_ner_model)))
    command = [sys.executable, "-m", "pipeline", "run", str(path), "--exported", str(tmp_path / "o")]
    subprocess.run(command, check=True, capture_output=True)
    second = subprocess.run(command, check=True, capture_output=True, text=True)
    assert "cached" in second.stderr and "skipped" in second.stderr
    assert "0 stage(s) ran, 1 cached" in second.stderr
