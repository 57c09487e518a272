"""Choosing an executor, several recipes in one run (local executor), and `--executor ray` without
ray installed: one line naming the install command, exit 2, nothing written."""

from __future__ import annotations

import sys

from helpers import export_only_recipe

from pipeline.cli import main


def test_executor_ray_without_ray_installed_exits_2_naming_the_install(
    write_recipe, tiny_ner_model, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    path = write_recipe(export_only_recipe(tiny_ner_model))
    out = tmp_path / "out"
    assert main(["run", str(path), "--exported", str(out), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --executor ray: the ray package is not installed; pip install '.[ray]' "
        "(or pip install ray==2.60.0)"
    ]
    assert not out.exists()


def test_address_needs_the_ray_executor(write_recipe, tiny_ner_model, tmp_path, capsys):
    path = write_recipe(export_only_recipe(tiny_ner_model))
    assert main(["run", str(path), "--exported", str(tmp_path / "o"), "--address", "auto"]) == 2
    assert "--address is for --executor ray" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_several_recipes_one_failing_the_others_finish(write_recipe, tiny_ner_model, tmp_path, capsys):
    """The local executor over two recipes: a bad one is found before anything runs (exit 2);
    a failing variant in one is reported with its recipe's name, the other recipe is built."""
    good = write_recipe(export_only_recipe(tiny_ner_model, name="one"), "one.yaml")
    strict = export_only_recipe(tiny_ner_model, name="two")
    strict["variants"] = {"fp32": [], "too-strict": [{"quantize": {"mode": "dynamic", "parity_atol": 1e-9}}]}
    failing = write_recipe(strict, "two.yaml")
    missing = write_recipe(export_only_recipe(tmp_path / "nope", name="three"), "three.yaml")
    out = tmp_path / "out"

    assert main(["run", str(good), str(missing), "--exported", str(out)]) == 2
    assert not (out / "one" / "fp32").exists()  # checked before the first stage ran
    assert main(["run", str(good), str(good), "--exported", str(out)]) == 2
    assert "given twice" in capsys.readouterr().err

    assert main(["run", str(failing), str(good), "--exported", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: two: variant too-strict failed: " in err and "exceeds atol" in err
    assert (out / "one" / "fp32" / "export" / "manifest.json").is_file()
    assert (out / "two" / "fp32" / "export" / "manifest.json").is_file()


def test_resource_requests_keep_timing_alone_on_its_node(tiny_ner_model):
    """A stage task holds a sliver of its node's `timing` resource; validation holds all of it
    (so neither starts beside the other), its latency threads in CPUs, and a GPU only for CUDA
    validation on a cluster that has one."""
    from pipeline.config import recipe_from_dict
    from pipeline.executors.ray_executor import TIMING, TIMING_SLIVER, stage_resources, timing_resources

    assert stage_resources(2, 16) == {"num_cpus": 2, "resources": {TIMING: TIMING_SLIVER}}
    assert stage_resources(8, 4)["num_cpus"] == 4  # never more than the largest node has
    assert TIMING_SLIVER * 1000 <= 1  # up to 1000 stage tasks per node; one timing task takes all

    document = export_only_recipe(tiny_ner_model)
    document["validate"] = {"latency": {"threads": 4}}
    cpu_only = recipe_from_dict(document)
    assert timing_resources(cpu_only, 2, 16, gpus=1) == {
        "num_cpus": 4,
        "num_gpus": 0,
        "resources": {TIMING: 1},
    }
    document["validate"]["providers"] = ["CPUExecutionProvider", "CUDAExecutionProvider"]
    cuda = recipe_from_dict(document)
    assert timing_resources(cuda, 2, 16, gpus=1)["num_gpus"] == 1
    assert timing_resources(cuda, 2, 16, gpus=0)["num_gpus"] == 0  # validate says CUDA is absent
