"""Release bundle for deployment teams, and its verification (onnxruntime only, no torch).

`exported/<recipe>/release/` holds the picked variant's model.onnx (+ model.onnx.data), its
config.json and tokenizer files, a README.md with an onnxruntime-only inference snippet, and
manifest.json: what the model is (task, labels, inputs/outputs with dtypes and dynamic axes,
opset), how it was made (every stage's config, versions, data hashes incl. calibration), how good
and how fast it is (metric, drop vs PyTorch, latency and the machine), which providers were
validated with which session options, a smoke-test expectation, and the sha256 of every file.

`python -m pipeline verify FOLDER` (`verify_release`) re-hashes every file, rejects missing and
extra files, and runs the smoke inference with onnxruntime + tokenizers only: this module imports
neither torch nor transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from pipeline.config import StrictModel
from pipeline.errors import InputError, PipelineError, StageError

if TYPE_CHECKING:
    from pipeline.recipe import Recipe

MANIFEST = "manifest.json"
README = "README.md"
FORMAT = "onnx-pipeline-release/1"
SMOKE_TEXT = "Alice flew from Paris to New York on Monday to meet the team at Acme ."
SMOKE_MIN_AGREEMENT = 0.9


class ReleaseConfig(StrictModel):
    """Recipe section `release`: which variant is handed to deployment."""

    pick: Literal["fastest_within_gates"] | str = Field(
        "fastest_within_gates",
        description="fastest_within_gates: the variant with the lowest p50 latency at fastest_at among "
        "those passing every gate; or a variant name (released only if it passes every gate).",
    )
    fastest_at: str | None = Field(
        None,
        description="Shape key ('b<batch>_s<seq>') that ranks speed for the pick and the report's chart; "
        "default: the first batch size and sequence length of validate.latency.",
    )

    @field_validator("fastest_at")
    @classmethod
    def _check_key(cls, value: str | None) -> str | None:
        if value is not None:
            from pipeline.bench.latency import parse_shape_key

            parse_shape_key(value)
        return value


# -- the pick --------------------------------------------------------------------------------------


def pick_release(recipe: Recipe, report: dict[str, Any]) -> dict[str, Any]:
    """{"variant": name or None, "reason": why}, from the report's figures and the recipe's gates."""
    from pipeline.gate import evaluate_variant

    variants = report["variants"]
    key = report.get("settings", {}).get("primary_latency_key")
    results = {name: evaluate_variant(recipe.gates, report, name) for name in variants}
    passing = [name for name, checks in results.items() if all(c.passed for c in checks)]

    def failures(name: str) -> str:
        return "; ".join(c.line().removeprefix("FAIL ") for c in results[name] if not c.passed)

    def describe(name: str) -> str:
        entry = variants[name]
        stats = (entry.get("latency") or {}).get(key) or {}
        speed = (entry.get("speedup_vs_pytorch") or {}).get(key)
        checks = len(results[name])
        return (
            f"p50 {stats.get('p50_ms', float('nan')):.3g} ms at {key}"
            + (f", {speed:.2f}x vs PyTorch" if speed else "")
            + f"; {report.get('metric_name')} {entry.get('metric', float('nan')):.4f}"
            + f" (drop {entry.get('metric_drop', float('nan')):.4f})"
            + (f"; passes all {checks} gate checks" if checks else "; no gates configured")
        )

    pick = recipe.release.pick
    if pick != "fastest_within_gates":
        if pick not in variants:
            return {"variant": None, "reason": f"release.pick {pick!r} was not validated (not a variant)"}
        if pick not in passing:
            return {"variant": None, "reason": f"release.pick {pick!r} fails its gates: {failures(pick)}"}
        return {"variant": pick, "reason": f"named by release.pick; {describe(pick)}"}
    if not passing:
        detail = " | ".join(f"{name}: {failures(name)}" for name in variants)
        return {"variant": None, "reason": f"no variant passes all gates: {detail}"}
    timed = [name for name in passing if key in (variants[name].get("latency") or {})]
    if not timed:
        return {"variant": None, "reason": f"no passing variant was timed at {key}"}
    fastest = min(timed, key=lambda name: variants[name]["latency"][key]["p50_ms"])
    return {"variant": fastest, "reason": f"fastest within all gates; {describe(fastest)}"}


# -- model description (build time: onnx is available) ---------------------------------------------


def describe_model(path: Path) -> dict[str, Any]:
    """Inputs/outputs (name, dtype, shape with symbolic dims, dynamic axes), opsets, producer."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)

    def values(items: Any) -> list[dict[str, Any]]:
        described = []
        for value in items:
            tensor = value.type.tensor_type
            shape = [
                d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                for d in tensor.shape.dim
            ]
            described.append(
                {
                    "name": value.name,
                    "dtype": str(helper.tensor_dtype_to_np_dtype(tensor.elem_type)),
                    "shape": shape,
                    "dynamic_axes": {str(i): d for i, d in enumerate(shape) if not isinstance(d, int)},
                }
            )
        return described

    initializers = {i.name for i in model.graph.initializer}
    opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    return {
        "file": "model.onnx",
        "external_data": sorted(p.name for p in Path(path).parent.glob("model.onnx?*") if p.is_file()),
        "opset": opsets.get("ai.onnx"),
        "opsets": opsets,
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": values(i for i in model.graph.input if i.name not in initializers),
        "outputs": values(model.graph.output),
        "nodes": len(model.graph.node),
        "op_types": sorted({n.op_type for n in model.graph.node}),
    }


# -- smoke inference (shared by build and verify; onnxruntime + tokenizers only) ---------------------


def smoke_run(folder: Path, smoke: dict[str, Any]) -> tuple[str, Any]:
    """Tokenise the smoke text with tokenizer.json and run model.onnx on CPU: (output name, array)."""
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
    return output, session.run([output], feeds)[0]


def smoke_expectation(folder: Path, task: str, max_length: int) -> dict[str, Any]:
    """Run the smoke inference once at build time and record what verify must see again."""
    import numpy as np

    smoke: dict[str, Any] = {"text": SMOKE_TEXT, "max_length": max_length}
    if task == "token-classification":
        smoke["words"] = SMOKE_TEXT.split()
    name, array = smoke_run(folder, smoke)
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


def _check_smoke(folder: Path, smoke: dict[str, Any]) -> list[str]:
    import numpy as np

    try:
        name, array = smoke_run(folder, smoke)
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


# -- build -----------------------------------------------------------------------------------------


def build_release(
    recipe: Recipe,
    report: dict[str, Any],
    variant_dirs: dict[str, Path],
    stage_manifests: dict[str, list[dict[str, Any]]],
    output_dir: Path,
) -> dict[str, Any] | None:
    """Write the bundle of report["release"]["variant"] into `output_dir`; None when no release."""
    from pipeline import manifest as mf
    from pipeline.onnx_utils import copy_metadata, model_file

    chosen = (report.get("release") or {}).get("variant")
    if chosen is None:
        return None
    if chosen not in variant_dirs or chosen not in report["variants"]:
        raise StageError(f"release: variant {chosen!r} has no artifact folder or no report entry")
    source = Path(variant_dirs[chosen])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_file(source)
    for item in sorted(source.glob("model.onnx*")):
        if item.is_file():
            shutil.copy2(item, out / item.name)
    copy_metadata(source, out)
    if not (out / "tokenizer.json").is_file():
        raise StageError(
            f"release: {source} has no tokenizer.json; deployment without transformers needs a fast "
            "tokenizer file (save the tokenizer with a fast tokenizer class)"
        )
    entry = report["variants"][chosen]
    config = (
        json.loads((out / "config.json").read_text(encoding="utf-8"))
        if (out / "config.json").is_file()
        else {}
    )
    id2label = config.get("id2label") or {}
    labels = (
        [id2label[k] for k in sorted(id2label, key=int)]
        if id2label and report.get("task") in ("token-classification", "text-classification")
        else None
    )
    manifests = stage_manifests.get(chosen, [])
    calibration = sorted(
        {m["data"]["calibration"] for m in manifests if (m.get("data") or {}).get("calibration")}
    )
    settings = report.get("settings", {})
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "recipe": report["recipe"],
        "variant": chosen,
        "task": report.get("task"),
        "labels": labels,
        "model": describe_model(out / "model.onnx"),
        "tokenizer": {
            "file": "tokenizer.json",
            "max_length": recipe.model.max_length,
            "pretokenized_words": report.get("task") == "token-classification",
        },
        "made_by": {
            "source_model": recipe.model.model_dump(mode="json"),
            "stages": [
                {
                    "stage": m.get("stage"),
                    "config": m.get("config"),
                    "cache_key": m.get("cache_key"),
                    "data": m.get("data") or {},
                    "versions": m.get("versions"),
                    "started_at": m.get("started_at"),
                }
                for m in manifests
            ],
            "calibration_data_sha256": calibration[0] if len(calibration) == 1 else (calibration or None),
            "versions": report.get("versions"),
        },
        "quality": {
            "metric_name": report.get("metric_name"),
            "metric": entry.get("metric"),
            "metrics": entry.get("metrics"),
            "pytorch_fp32_metric": report["baseline"].get("metric"),
            "metric_drop_vs_fp32": entry.get("metric_drop"),
            "agreement_with_fp32": entry.get("agreement"),
            "eval_examples": settings.get("eval_examples"),
            "eval_data_sha256": settings.get("eval_data_sha256"),
        },
        "speed": {
            "latency_cpu": entry.get("latency"),
            "speedup_vs_pytorch": entry.get("speedup_vs_pytorch"),
            "pytorch_latency": report["baseline"].get("latency"),
            "threads": settings.get("latency", {}).get("threads"),
            "measured_on": report.get("machine"),
            "size_bytes": entry.get("size_bytes"),
            "peak_rss_bytes": entry.get("peak_rss_bytes"),
        },
        "providers": {
            "validated": {
                provider: {
                    k: v
                    for k, v in result.items()
                    if k in ("status", "reason", "session_providers", "node_placement", "metric", "agreement")
                }
                for provider, result in (entry.get("providers") or {}).items()
            },
            "session_options": settings.get("session_options"),
        },
        "gates": {
            name: g for name, g in (report.get("gates") or {}).items() if name.startswith(chosen + "/")
        },
        "release_reason": report["release"].get("reason"),
    }
    manifest["smoke"] = smoke_expectation(out, report.get("task", ""), recipe.model.max_length)
    (out / README).write_text(render_readme(manifest), encoding="utf-8")
    manifest["files"] = mf.hash_folder(out, exclude=(MANIFEST,))
    mf.write_json(out / MANIFEST, manifest)
    return manifest


_SNIPPET_COMMON = """import json

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

manifest = json.load(open("manifest.json"))
tokenizer = Tokenizer.from_file("tokenizer.json")
tokenizer.enable_truncation(manifest["tokenizer"]["max_length"])
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
dtypes = {i["name"]: i["dtype"] for i in manifest["model"]["inputs"]}


def feeds(encoding):
    columns = {"input_ids": encoding.ids, "attention_mask": encoding.attention_mask,
               "token_type_ids": encoding.type_ids}
    return {name: np.array([columns[name]], dtype=dtypes[name]) for name in dtypes}

"""
_SNIPPETS = {
    "token-classification": """
words = "Alice flew from Paris to New York".split()
encoding = tokenizer.encode(words, is_pretokenized=True)
logits = session.run(None, feeds(encoding))[0][0]
seen = set()
for position, word in enumerate(encoding.word_ids):
    if word is not None and word not in seen:  # the first sub-word of each word carries its tag
        seen.add(word)
        print(words[word], manifest["labels"][int(logits[position].argmax())])
""",
    "text-classification": """
encoding = tokenizer.encode("Shares rose sharply after the company raised its forecast.")
logits = session.run(None, feeds(encoding))[0][0]
print(manifest["labels"][int(logits.argmax())])
""",
    "text-generation": """
encoding = tokenizer.encode("The company said that")
ids = np.array([encoding.ids], dtype=np.int64)
inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids),
          "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
for value in session.get_inputs():  # an empty KV cache: [batch, heads, 0, head_dim]
    if value.name.startswith("past_key_values"):
        shape = [1] + [d if isinstance(d, int) else 0 for d in value.shape[1:]]
        inputs[value.name] = np.zeros(shape, dtype=dtypes[value.name])
logits = session.run(None, {name: inputs[name] for name in dtypes})[0]
print(tokenizer.decode([int(logits[0, -1].argmax())]))  # the greedy next token
""",
    "feature-extraction": """
encoding = tokenizer.encode("A sentence to embed.")
hidden = session.run(None, feeds(encoding))[0][0]            # (tokens, hidden)
mask = np.array(encoding.attention_mask, dtype=np.float32)[:, None]
embedding = (hidden * mask).sum(0) / mask.sum()              # mean pooling
print(embedding.shape)
""",
}


def render_readme(manifest: dict[str, Any]) -> str:
    quality, speed = manifest["quality"], manifest["speed"]
    model = manifest["model"]
    providers = manifest["providers"]["validated"]
    lines = [
        f"# {manifest['recipe']} / {manifest['variant']}",
        "",
        f"ONNX model for **{manifest['task']}**, released by the onnx-pipeline "
        f"({manifest['release_reason']}).",
        "",
        f"- inputs: {', '.join(i['name'] + ' ' + i['dtype'] + str(i['shape']) for i in model['inputs'])}",
        f"- outputs: {', '.join(o['name'] + ' ' + o['dtype'] + str(o['shape']) for o in model['outputs'])}",
        f"- opset {model['opset']} ({', '.join(f'{d} {v}' for d, v in model['opsets'].items())})",
        f"- labels: {', '.join(manifest['labels'] or []) or 'n/a'}",
        f"- {quality['metric_name']}: {quality['metric']:.4f} "
        f"(PyTorch fp32 {quality['pytorch_fp32_metric']:.4f}, "
        f"drop {quality['metric_drop_vs_fp32']:.4f}) on {quality['eval_examples']} eval examples",
        "- speed-up vs PyTorch eager fp32 (same run, "
        f"{speed['threads']} thread(s), {(speed['measured_on'] or {}).get('cpu_model', '?')}): "
        + ", ".join(f"{k} {v:.2f}x" for k, v in (speed["speedup_vs_pytorch"] or {}).items()),
        "- providers validated: "
        + ", ".join(
            f"{p.removesuffix('ExecutionProvider')}: {r.get('status')}" for p, r in providers.items()
        ),
        "",
        "Everything about how it was made, how fast and how accurate it is lives in `manifest.json`.",
        "Check the bundle: with the onnx-pipeline installed (hashes, missing/extra files and a smoke",
        "inference; no PyTorch needed) `python -m pipeline verify .`; with the standard library only:",
        "",
        "```python",
        "import hashlib, json",
        'for f in json.load(open("manifest.json"))["files"]:',
        '    assert hashlib.sha256(open(f["path"], "rb").read()).hexdigest() == f["sha256"], f["path"]',
        "```",
        "",
        "## Inference with onnxruntime and tokenizers only",
        "",
        "```python",
        (_SNIPPET_COMMON + _SNIPPETS.get(manifest["task"], _SNIPPETS["feature-extraction"])).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


# -- verify ----------------------------------------------------------------------------------------


def verify_release(folder: Path) -> list[str]:
    """Problems with a release bundle (empty list = OK): hashes, sizes, missing and extra files,
    model inputs/outputs vs the manifest, and a smoke inference (onnxruntime + tokenizers only)."""
    from pipeline.manifest import sha256_file

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
    count = len(json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"])
    print(f"verify {folder}: OK ({count} files match their sha256; smoke inference matches)", file=out)
    return 0


def main_verify(argv: list[str] | None = None) -> int:
    """Stand-alone entry point with the CLI's behaviour: prints errors, returns the exit code."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipeline verify", description="Check a release bundle.")
    parser.add_argument("folder", type=Path, help="release folder, e.g. exported/<recipe>/release")
    args = parser.parse_args(argv)
    try:
        return verify_command(args.folder)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
