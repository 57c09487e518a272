"""The release: which variant is picked (pick), the bundle handed to deployment (bundle), and its
verification with onnxruntime only (verify)."""

from pipeline.release.bundle import build_release, describe_model, render_readme
from pipeline.release.pick import pick_release
from pipeline.release.verify import smoke_run, verify_command, verify_release

__all__ = [
    "build_release",
    "describe_model",
    "pick_release",
    "render_readme",
    "smoke_run",
    "verify_command",
    "verify_release",
]
