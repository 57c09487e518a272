"""The package's layers (pyproject.toml [tool.importlinter]): no module imports a layer above it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def test_import_layers_are_kept():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a dev dependency (make setup installs it)"
    done = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in done.stdout


def test_every_stage_is_registered_validate_included():
    from pipeline.stages.registry import all_stages

    assert set(all_stages()) == {
        "finetune",
        "prune",
        "export",
        "optimize",
        "quantize",
        "adapters",
        "search",
        "validate",
    }
