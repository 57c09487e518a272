"""The Ray executor on a local Ray cluster (loopback, 2 CPUs): the same outputs, manifests' hashes,
cache keys and one-line errors as the local executor; a killed worker publishes nothing partial.

Skipped when ray is not installed (`pip install '.[ray]'`; `make test` installs it).
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import VALIDATE_NER_LABELS, export_only_recipe, make_ner_examples, tiny_model, write_conll

ray = pytest.importorskip("ray")

from pipeline.cli import main  # noqa: E402
from pipeline.config import recipe_from_dict  # noqa: E402
from pipeline.errors import StageError  # noqa: E402
from pipeline.executors.ray_executor import TIMING, RayExecutor  # noqa: E402
from pipeline.runner import Runner  # noqa: E402

BOUND_S = 300  # no test here waits longer than this for a run


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for the module, as `ray start --head --num-cpus 2` would give."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        resources={TIMING: 1},
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
    )
    yield ray
    ray.shutdown()


def _recipes(root: Path, tiny_ner_model: Path) -> list[Path]:
    """Two tiny recipes: one with a variant that fails its parity check, one validated with static
    INT8 (calibration data travels with the tasks) and a fused variant."""
    failing = export_only_recipe(tiny_ner_model, name="tiny-a")
    failing["variants"] = {
        "fp32": [],
        "int8": [{"quantize": {"mode": "dynamic"}}],
        "too-strict": [{"quantize": {"mode": "dynamic", "parity_atol": 1e-9}}],
    }
    model = tiny_model(root / "model-b", labels=VALIDATE_NER_LABELS, classifier_scale=20.0)
    examples = list(dict.fromkeys(make_ner_examples(60, seed=4)))
    validated = {
        "name": "tiny-b",
        "model": {"source": str(model), "task": "token-classification", "max_length": 32},
        "data": {
            "train": {"source": str(write_conll(root / "train.txt", examples[:30]))},
            "eval": {"source": str(write_conll(root / "eval.txt", examples[30:]))},
            "calibration": {"from": "train", "samples": 8},
        },
        "export": {"opset": 18, "parity": {"atol": 1e-4, "shapes": [[1, 8], [2, 16], [3, 11]]}},
        "variants": {"fp32": [], "fused": ["optimize"], "int8-static": [{"quantize": {"mode": "static"}}]},
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
    paths = []
    for document in (failing, validated):
        path = root / f"{document['name']}.yaml"
        path.write_text(yaml.safe_dump(document))
        paths.append(path)
    return paths


def _stage_manifests(exported: Path) -> dict[str, dict]:
    """Every stage manifest below exported/ (validation excluded: it holds timings)."""
    found = {}
    for path in sorted(exported.glob("*/*/*/manifest.json")):
        manifest = json.loads(path.read_text())
        found[str(path.parent.relative_to(exported))] = manifest
    return found


def _errors(text: str, exported: Path) -> list[str]:
    """The one-line errors, the output root and temp folders' random suffixes left out."""
    lines = [line.replace(str(exported), "EXPORTED") for line in text.splitlines()]
    return sorted(
        re.sub(r"(\.tmp-[\w.-]+)-[0-9a-f]{8}", r"\1", line) for line in lines if line.startswith("error: ")
    )


@pytest.fixture(scope="module")
def both_runs(ray_cluster, tiny_ner_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-vs-local")
    recipes = [str(p) for p in _recipes(root, tiny_ner_model)]
    runs = {}
    for executor in ("local", "ray"):
        exported = root / executor
        err = root / f"{executor}.err"
        started = time.perf_counter()
        code = _main_capturing(["run", *recipes, "--exported", str(exported), "--executor", executor], err)
        runs[executor] = {
            "code": code,
            "exported": exported,
            "errors": _errors(err.read_text(), exported),
            "seconds": time.perf_counter() - started,
        }
    return {"root": root, "recipes": recipes, **runs}


def _main_capturing(argv: list[str], err: Path) -> int:
    import contextlib

    with open(err, "w") as handle, contextlib.redirect_stderr(handle):
        return main(argv)


def test_ray_outputs_are_byte_identical_to_the_local_executor(both_runs):
    local, remote = both_runs["local"], both_runs["ray"]
    assert local["code"] == remote["code"] == 1  # tiny-a's too-strict variant fails in both
    assert local["errors"] == remote["errors"]
    strict = [line for line in remote["errors"] if "tiny-a: variant too-strict failed: " in line]
    assert len(strict) == 1 and "exceeds atol" in strict[0]
    expected, found = _stage_manifests(local["exported"]), _stage_manifests(remote["exported"])
    assert sorted(found) == sorted(expected)
    assert len(found) == 5  # tiny-a: export, int8's quantize; tiny-b: export, optimize, quantize
    for folder, manifest in expected.items():
        assert found[folder]["cache_key"] == manifest["cache_key"], folder
        assert found[folder]["outputs"] == manifest["outputs"], folder  # path, sha256, bytes
    assert not (remote["exported"] / "tiny-a" / "too-strict" / "quantize").exists()
    assert not list(remote["exported"].rglob(".tmp-*")) and not list(remote["exported"].rglob(".old-*"))
    # Validation ran on Ray too (the timing task): report, release, variants index.
    report = json.loads((remote["exported"] / "tiny-b" / "report.json").read_text())
    assert set(report["variants"]) == {"fp32", "fused", "int8-static"}
    assert (remote["exported"] / "tiny-b" / "release" / "manifest.json").is_file()
    index = json.loads((remote["exported"] / "tiny-a" / "variants.json").read_text())["variants"]
    assert index["int8"]["artifact"] == "int8/quantize"


def test_a_local_run_after_ray_finds_everything_cached(both_runs):
    """Same cache keys: a local run over the Ray run's exported/ re-runs only what failed."""
    exported = both_runs["ray"]["exported"]
    from pipeline.config import load_recipe

    failing, validated = (load_recipe(Path(p)) for p in both_runs["recipes"])
    again = Runner(validated, exported=exported).run()
    assert again.ran == []
    assert sorted(again.cached) == ["fp32/export", "fused/optimize", "int8-static/quantize"]
    retried = Runner(failing, exported=exported).run()
    assert retried.ran == [] and set(retried.failed) == {"too-strict"}  # re-done, fails again
    assert sorted(retried.cached) == ["fp32/export", "int8/quantize"]


def _worker_running(task_name: str):
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith(f"ray::{task_name}"):
            return process
    return None


def _kill_mid_stage(runner: Runner, executor: RayExecutor, folder: Path, task_name: str) -> dict:
    """Run in a thread; SIGKILL the worker once the stage has begun writing its temp folder."""
    box: dict = {}

    def target():
        box["outcomes"] = executor.run([runner])

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + BOUND_S
    killed = None
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        if list(folder.parent.glob(f".tmp-{folder.name}-*")):
            process = _worker_running(task_name)
            if process is not None:
                process.send_signal(signal.SIGKILL)
                killed = process.pid
        time.sleep(0.02)
    thread.join(BOUND_S)
    assert not thread.is_alive(), "the Ray run did not end in time"
    assert killed is not None, "the stage ended before its worker could be killed"
    return box["outcomes"][0]


def test_a_killed_worker_publishes_nothing_and_the_rerun_completes(ray_cluster, both_runs, tiny_ner_model):
    exported = both_runs["root"] / "killed"
    recipe = recipe_from_dict(export_only_recipe(tiny_ner_model, name="tiny-kill"))
    folder = exported / "tiny-kill" / "fp32" / "export"

    task = "pipeline:tiny-kill/fp32/export"
    outcome = _kill_mid_stage(Runner(recipe, exported=exported), RayExecutor(max_retries=0), folder, task)
    assert isinstance(outcome.error, StageError)
    message = str(outcome.error)
    assert "\n" not in message and message.startswith("[1/1] fp32/export: export failed: ")
    assert not folder.exists()  # nothing published
    assert not list(exported.rglob(".tmp-*"))  # the dead task's temp folder is gone

    rerun = RayExecutor(max_retries=0).run([Runner(recipe, exported=exported)])[0]
    assert rerun.error is None and rerun.result.ran == ["fp32/export"]
    local = both_runs["local"]["exported"] / "tiny-a" / "fp32" / "export" / "manifest.json"
    assert (
        json.loads((folder / "manifest.json").read_text())["outputs"]
        == json.loads(local.read_text())["outputs"]
    )


def test_a_killed_worker_is_retried_within_the_run(ray_cluster, both_runs, tiny_ner_model):
    exported = both_runs["root"] / "retried"
    recipe = recipe_from_dict(export_only_recipe(tiny_ner_model, name="tiny-retry"))
    folder = exported / "tiny-retry" / "fp32" / "export"
    task = "pipeline:tiny-retry/fp32/export"
    outcome = _kill_mid_stage(Runner(recipe, exported=exported), RayExecutor(max_retries=1), folder, task)
    assert outcome.error is None and outcome.result.ran == ["fp32/export"]
    assert (folder / "manifest.json").is_file() and not list(exported.rglob(".tmp-*"))
