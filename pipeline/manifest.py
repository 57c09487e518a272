"""Stage manifests: what a stage output is, how it was made, and hashes that prove it is intact."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
# Packages whose versions change what a stage produces; they are part of every cache key.
VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxscript",
    "onnx-pipeline",
)
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that matter (None where not installed)."""
    import platform

    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def hash_folder(folder: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> list[dict[str, Any]]:
    """[{path, sha256, bytes}] for every file below `folder`, sorted, paths relative to it."""
    entries = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative in exclude:
            continue
        entries.append({"path": relative, "sha256": sha256_file(path), "bytes": path.stat().st_size})
    return entries


def digest_of(entries: list[dict[str, Any]]) -> str:
    """One sha256 over a file list (path + hash), so a folder's identity is its content."""
    return sha256_text(json.dumps([[e["path"], e["sha256"]] for e in entries], sort_keys=True))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest in `folder`, or None when missing or unreadable (then it is simply re-run)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def outputs_intact(folder: Path, manifest: dict[str, Any]) -> bool:
    """Every output the manifest lists exists with its recorded size and sha256."""
    for entry in manifest.get("outputs", []):
        path = Path(folder) / entry["path"]
        try:
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                return False
        except OSError:
            return False
    return True


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically: a temp file beside the target, fsync, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
