"""The one ONNX Runtime session factory, provider availability and where nodes really ran.

`get_available_providers()` lists CUDA even on a machine with no GPU, and a session asked for CUDA
silently runs on CPU (DESIGN.md §7-8): a provider counts as available only when a GPU is visible,
and a session is trusted only when `session.get_providers()` puts the asked-for provider first.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, first_line

CPU = "CPUExecutionProvider"
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def session_options(threads: int | None) -> dict[str, Any]:
    """The session options `open_session` applies (recorded in reports and release manifests)."""
    return {
        "intra_op_num_threads": threads,
        "inter_op_num_threads": 1 if threads else None,
        "execution_mode": "ORT_SEQUENTIAL",
        "graph_optimization_level": "ORT_ENABLE_ALL",
    }


def open_session(
    path: Path, provider: str = CPU, threads: int | None = None, profile_prefix: str | None = None
) -> Any:
    """An InferenceSession of `path` on `provider` (CPU as the last resort behind a GPU provider).

    A corrupt or non-ONNX file is an InputError: `onnx.checker` passing is not enough (DESIGN.md
    §7), only a real session proves a model loads. `threads` pins the intra-op thread count (one
    inter-op thread); `profile_prefix` turns ORT's profiler on (see `node_placement`).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if provider == CPU:
        providers = [CPU]
    elif provider == "TensorrtExecutionProvider":
        providers = [provider, "CUDAExecutionProvider", CPU]
    else:
        providers = [provider, CPU]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # ORT raises several unrelated types for bad files
        where = "" if provider == CPU else f" on {provider}"
        raise InputError(f"{path}: ONNX Runtime cannot load this model{where}: {first_line(err)}") from None


def gpu_present() -> bool:
    """An NVIDIA GPU is visible to this process (driver loaded and a device listed)."""
    import shutil
    import subprocess

    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    if shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return False
        return listed.returncode == 0 and "GPU" in listed.stdout
    return False


def provider_availability(provider: str) -> tuple[bool, str]:
    """(usable, reason) for an execution provider on this machine, without trusting the package's
    provider list alone (onnxruntime-gpu lists CUDA even where no GPU exists)."""
    import onnxruntime as ort

    if provider == CPU:
        return True, ""
    if provider not in ort.get_available_providers():
        return False, f"this onnxruntime {ort.__version__} build has no {provider}"
    if provider in GPU_PROVIDERS and not gpu_present():
        return False, "no NVIDIA GPU found"
    return True, ""


def node_placement(profile_path: str) -> dict[str, Any]:
    """Nodes per execution provider (and op types per provider) from an ORT profile file."""
    try:
        events = json.loads(Path(profile_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    finally:
        Path(profile_path).unlink(missing_ok=True)
    nodes: dict[str, dict[str, str]] = {}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and args.get("provider"):
            name = str(event.get("name", "")).removesuffix("_kernel_time")
            nodes.setdefault(args["provider"], {})[name] = args.get("op_name", "?")
    return {
        provider: {"nodes": len(found), "ops": dict(sorted(Counter(found.values()).items()))}
        for provider, found in sorted(nodes.items())
    }
