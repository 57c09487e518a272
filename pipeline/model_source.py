"""Model sources: a hub id, a local folder, or `package:<name>` for a model inside an installed package.

Every source resolves to a local folder holding config.json (+ weights and tokenizer files). Hub
downloads need a network; offline, the error says so and how to point at a local folder instead.
Models built here from configs (pipeline.zoo) say in config.json that their weights are random
(`random_weights`): every figure measured on them must say so too.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from pipeline.errors import InputError

PACKAGE_PREFIX = "package:"
# Key written into config.json by the model builders when the weights are random.
RANDOM_WEIGHTS_KEY = "pipeline_random_weights"
# Files a hub download needs: configs, tokenizer, safetensors weights (never pickled .bin files).
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "merges.txt", "vocab.*"]


def resolve_model_source(source: str, revision: str | None = None) -> Path:
    """Local folder for `source`; InputError naming the source when it cannot be had."""
    if source.startswith(PACKAGE_PREFIX):
        folder = _package_model(source.removeprefix(PACKAGE_PREFIX))
    elif _looks_local(source):
        folder = Path(source).expanduser()
        if not folder.exists():
            raise InputError(f"model.source: local folder {source!r} does not exist")
        if not folder.is_dir():
            raise InputError(f"model.source: {source!r} is a file; expected a model folder")
    else:
        folder = _hub_snapshot(source, revision)
    if not (folder / "config.json").is_file():
        raise InputError(f"model.source: {folder} holds no config.json (not a Hugging Face model folder)")
    return folder


def _looks_local(source: str) -> bool:
    # A hub id is "name" or "org/name"; anything that exists, or looks like a path, is local.
    return (
        Path(source).expanduser().exists()
        or source.startswith(("/", "./", "../", "~"))
        or source.count("/") > 1
    )


def _package_model(spec: str) -> Path:
    """`pkg` -> pkg.get_model_path() or the package folder; `pkg/sub/dir` -> that folder inside it."""
    package, _, subpath = spec.partition("/")
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise InputError(
            f"model.source: package {package!r} is not installed (pip install {package.replace('_', '-')})"
        ) from None
    if subpath:
        folder = Path(module.__file__).parent / subpath
    elif hasattr(module, "get_model_path"):
        folder = Path(module.get_model_path())
    else:
        folder = Path(module.__file__).parent
    if not folder.is_dir():
        raise InputError(f"model.source: {PACKAGE_PREFIX}{spec} resolves to {folder}, which is not a folder")
    return folder


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=offline
        )
    except Exception as err:  # network, auth, missing repo: all end the run the same way
        reason = "the machine is offline" if offline or _is_connection_error(err) else type(err).__name__
        raise InputError(
            f"model.source: cannot download hub model {repo_id!r} ({reason}); download it where a "
            f"network exists and set model.source to the local folder, or use package:<name>"
        ) from None
    return Path(path)


def _is_connection_error(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(word in text for word in ("connection", "offline", "resolve", "timed out", "network"))


def random_weights(folder: str | Path) -> bool:
    """Whether config.json in `folder` says the weights are random (`RANDOM_WEIGHTS_KEY`)."""
    path = Path(folder) / "config.json"
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get(RANDOM_WEIGHTS_KEY, False))
    except (OSError, ValueError):
        return False
