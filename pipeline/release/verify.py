"""Verification of a release bundle with onnxruntime + tokenizers only (no torch, no transformers).

`python -m pipeline verify FOLDER` (`verify_release`) re-hashes every file, rejects missing and
extra files, checks the model's inputs and outputs against the manifest, and runs the smoke
inference, whose expected output the bundle recorded when it was built (`smoke_expectation`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.manifest import sha256_file

MANIFEST = "manifest.json"
SMOKE_TEXT = "Alice flew from Paris to New York on Monday to meet the team at Acme ."
SMOKE_MIN_AGREEMENT = 0.9


def smoke_run(folder: Path, smoke: dict[str, Any], adapter: str | None = None) -> tuple[str, Any]:
    """Tokenise the smoke text with tokenizer.json and run model.onnx on CPU: (output name, array).
    `adapter`: a LoRA adapter file of the bundle (relative path) active for the run."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    folder = Path(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(int(smoke["max_length"]))
    if smoke.get("words"):
        encoding = tokenizer.encode(list(smoke["words"]), is_pretokenized=True)
    else:
        encoding = tokenizer.encode(smoke["text"])
    columns = {
        "input_ids": encoding.ids,
        "attention_mask": encoding.attention_mask,
        "token_type_ids": encoding.type_ids,
        "position_ids": list(range(len(encoding.ids))),
    }
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(folder / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
    )
    feeds = {}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):  # decoder KV cache: an empty past
            shape = [d if isinstance(d, int) else 0 for d in value.shape]
            shape[0] = 1
            feeds[value.name] = np.zeros(shape, dtype=np.float16 if "float16" in value.type else np.float32)
            continue
        if value.name not in columns:
            raise ValueError(f"model input {value.name!r} cannot be built from the tokenizer")
        dtype = np.int32 if "int32" in value.type else np.int64
        feeds[value.name] = np.asarray([columns[value.name]], dtype=dtype)
    output = session.get_outputs()[0].name
    run_options = ort.RunOptions()
    if adapter is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(folder / adapter))
        run_options.add_active_adapter(lora)
    return output, session.run([output], feeds, run_options)[0]


def smoke_expectation(folder: Path, task: str, max_length: int, adapter: str | None = None) -> dict[str, Any]:
    """Run the smoke inference once at build time (with `adapter` active, if given) and record what
    verify must see again."""
    import numpy as np

    smoke: dict[str, Any] = {"text": SMOKE_TEXT, "max_length": max_length}
    if task == "token-classification":
        smoke["words"] = SMOKE_TEXT.split()
    name, array = smoke_run(folder, smoke, adapter)
    smoke.update(
        {
            "output": name,
            "shape": list(array.shape),
            "argmax": np.asarray(array).argmax(-1).reshape(-1).tolist()
            if array.ndim and array.shape[-1] > 1
            else None,
            "min_argmax_agreement": SMOKE_MIN_AGREEMENT,
        }
    )
    return smoke


def _check_smoke(folder: Path, smoke: dict[str, Any], adapter: str | None = None) -> list[str]:
    import numpy as np

    try:
        name, array = smoke_run(folder, smoke, adapter)
    except Exception as err:  # any failure to tokenise or run is a problem to report
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return [f"smoke inference failed: {first}"]
    problems = []
    if name != smoke.get("output"):
        problems.append(f"smoke inference: first output is {name!r}, manifest says {smoke.get('output')!r}")
    if list(array.shape) != list(smoke.get("shape") or []):
        problems.append(
            f"smoke inference: output shape {list(array.shape)}, manifest says {smoke.get('shape')}"
        )
        return problems
    if not np.all(np.isfinite(array)):
        problems.append("smoke inference: output has NaN/inf")
    expected = smoke.get("argmax")
    if expected is not None:
        got = np.asarray(array).argmax(-1).reshape(-1)
        agreement = float(np.mean(got == np.asarray(expected))) if len(expected) else 1.0
        if agreement < float(smoke.get("min_argmax_agreement", SMOKE_MIN_AGREEMENT)):
            problems.append(
                f"smoke inference: argmax agrees with the recorded output on {agreement:.0%} of positions "
                f"(need {smoke.get('min_argmax_agreement', SMOKE_MIN_AGREEMENT):.0%})"
            )
    return problems


def verify_release(folder: Path) -> list[str]:
    """Problems with a release bundle (empty list = OK): hashes, sizes, missing and extra files,
    model inputs/outputs vs the manifest, and a smoke inference (onnxruntime + tokenizers only)."""

    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: not a folder"]
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{path}: missing (not a release bundle)"]
    except (OSError, ValueError) as err:
        return [f"{path}: unreadable or not valid JSON ({type(err).__name__})"]
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not all(
        isinstance(e, dict) and {"path", "sha256", "bytes"} <= set(e) for e in files
    ):
        return [f"{path}: no valid 'files' list of {{path, sha256, bytes}}"]
    problems: list[str] = []
    listed: dict[str, dict[str, Any]] = {}
    for entry in files:
        relative = str(entry["path"])
        if relative.startswith("/") or ".." in Path(relative).parts:
            problems.append(f"{relative}: unsafe path in manifest.json")
            continue
        listed[relative] = entry
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    present.discard(MANIFEST)
    for relative in sorted(set(listed) - present):
        problems.append(f"{relative}: listed in manifest.json but missing")
    for relative in sorted(present - set(listed)):
        problems.append(f"{relative}: not listed in manifest.json (unexpected file)")
    for relative, entry in sorted(listed.items()):
        file = folder / relative
        if relative not in present:
            continue
        if file.is_symlink():
            problems.append(f"{relative}: is a symbolic link (a bundle holds plain files)")
            continue
        size = file.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{relative}: {size} bytes, manifest says {entry['bytes']}")
        digest = sha256_file(file)
        if digest != entry["sha256"]:
            problems.append(
                f"{relative}: sha256 {digest[:12]}... does not match "
                f"the manifest's {str(entry['sha256'])[:12]}..."
            )
    if problems:
        return problems + ["smoke inference skipped: the files do not match the manifest"]
    model = manifest.get("model") or {}
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            str(folder / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return [f"model.onnx: onnxruntime cannot load it: {first}"]
    for kind, actual in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        expected = [v.get("name") for v in model.get(kind) or []]
        names = [v.name for v in actual]
        if expected != names:
            problems.append(f"model.onnx: {kind} {names}, manifest says {expected}")
    smoke = manifest.get("smoke")
    if not isinstance(smoke, dict) or "max_length" not in smoke:
        problems.append(f"{path}: no 'smoke' section to check an inference against")
    elif not problems:
        problems += _check_smoke(folder, smoke)
        for entry in manifest.get("adapters") or []:  # each LoRA adapter: its own recorded smoke output
            name = entry.get("name")
            if not isinstance(entry.get("smoke"), dict) or not entry.get("file"):
                problems.append(f"{path}: adapter {name!r} has no file or smoke record")
                continue
            checked = _check_smoke(folder, {**smoke, **entry["smoke"]}, adapter=entry["file"])
            problems += [f"adapter {name}: {problem}" for problem in checked]
    return problems


def verify_command(folder: Path, out: Any = None) -> int:
    """`python -m pipeline verify FOLDER`: 0 when the bundle checks out, 1 on any problem;
    InputError (exit 2) when FOLDER is not a folder or has no manifest.json."""
    import sys

    out = out or sys.stdout
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (expected exported/<recipe>/release)")
    if not (folder / MANIFEST).is_file():
        raise InputError(f"{folder}: no {MANIFEST}; not a release bundle")
    problems = verify_release(folder)
    for problem in problems:
        print(f"FAIL {problem}", file=out)
    if problems:
        print(f"verify {folder}: {len(problems)} problem(s)", file=out)
        return 1
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    adapters = len(manifest.get("adapters") or [])
    smoke = (
        f"smoke inference matches, base and {adapters} LoRA adapter(s)"
        if adapters
        else "smoke inference matches"
    )
    print(f"verify {folder}: OK ({len(manifest['files'])} files match their sha256; {smoke})", file=out)
    return 0
