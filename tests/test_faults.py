"""Faults: killed runs, disk-full and permission errors never leave a trusted half-written model."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import export_only_recipe

from pipeline.config import recipe_from_dict
from pipeline.errors import StageError
from pipeline.runner import Runner


def _outputs(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return {o["path"]: o["sha256"] for o in manifest["outputs"]}


def test_disk_full_keeps_previous_outputs(tiny_ner_model, tmp_path, monkeypatch):
    exported = tmp_path / "out"
    Runner(recipe_from_dict(export_only_recipe(tiny_ner_model)), exported=exported).run()
    folder = exported / "tiny" / "fp32" / "export"
    before = _outputs(folder)

    import pipeline.manifest as mf

    def full_disk(path, payload):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(mf, "write_json", full_disk)
    changed = export_only_recipe(tiny_ner_model)
    changed["export"]["opset"] = 17
    with pytest.raises(StageError, match="could not write .*manifest.json: No space left on device"):
        Runner(recipe_from_dict(changed), exported=exported).run()
    assert _outputs(folder) == before
    assert not list(folder.parent.glob(".tmp-*"))


def test_permission_error_is_clear(tiny_ner_model, tmp_path, monkeypatch):
    from pathlib import Path

    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name.startswith(".tmp-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(StageError, match="cannot create .*: Permission denied"):
        Runner(recipe_from_dict(export_only_recipe(tiny_ner_model)), exported=tmp_path / "out").run()


@pytest.mark.parametrize("kills", [pytest.param(5), pytest.param(20, marks=pytest.mark.slow)])
def test_killed_runs_never_leave_a_trusted_half_written_model(tiny_ner_model, tmp_path, kills):
    """SIGKILL a run at random moments; each following run completes with the same outputs."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(export_only_recipe(tiny_ner_model)))
    command = [sys.executable, "-m", "pipeline", "run", str(recipe), "--exported"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    clean = tmp_path / "clean"
    started = time.perf_counter()
    subprocess.run([*command, str(clean)], check=True, capture_output=True, env=env)
    duration = time.perf_counter() - started
    expected = _outputs(clean / "tiny" / "fp32" / "export")

    victim = tmp_path / "victim"
    rng = random.Random(0)
    for _ in range(kills):
        process = subprocess.Popen(
            [*command, str(victim)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        time.sleep(rng.uniform(0.3, duration))
        process.send_signal(signal.SIGKILL)
        process.wait()
        # Whatever the kill left, the next run must complete and match an uninterrupted run.
        subprocess.run([*command, str(victim)], check=True, capture_output=True, env=env)
        assert _outputs(victim / "tiny" / "fp32" / "export") == expected
        assert not list((victim / "tiny" / "fp32").glob(".tmp-*"))
