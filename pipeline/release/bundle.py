"""Release bundle for deployment teams: the picked variant, ready to run with onnxruntime alone.

`exported/<recipe>/release/` holds the picked variant's model.onnx (+ model.onnx.data), its
config.json and tokenizer files, a README.md (templates/README.md.j2) with an onnxruntime-only
inference snippet, and manifest.json: what the model is (task, labels, inputs/outputs with dtypes
and dynamic axes, opset), how it was made (every stage's config, versions, data hashes incl.
calibration), how good and how fast it is (metric, drop vs PyTorch, latency and the machine),
which providers were validated with which session options, a smoke-test expectation, and the
sha256 of every file. `pipeline.release.verify` checks all of it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.config.model import ModelSpec
from pipeline.errors import StageError
from pipeline.release.verify import MANIFEST, smoke_expectation

README = "README.md"
FORMAT = "onnx-pipeline-release/1"
TEMPLATES = Path(__file__).parent / "templates"


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


def build_release(
    report: dict[str, Any],
    variant_dirs: dict[str, Path],
    stage_manifests: dict[str, list[dict[str, Any]]],
    output_dir: Path,
    *,
    model: ModelSpec,
    task: Any,
) -> dict[str, Any] | None:
    """Write the bundle of report["release"]["variant"] into `output_dir`; None when no release.

    `model` is the recipe's model section (source, tokenizer max_length); `task` its Task (the
    inference snippet of the README)."""
    from pipeline import manifest as mf
    from pipeline.onnx.io import copy_metadata, model_file

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
    adapters = _copy_adapters(source, out)
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
            "max_length": model.max_length,
            "pretokenized_words": report.get("task") == "token-classification",
        },
        "made_by": {
            "source_model": model.model_dump(mode="json"),
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
    manifest["smoke"] = smoke_expectation(out, report.get("task", ""), model.max_length)
    if adapters:
        manifest["adapters"] = [
            {
                **adapter,
                "smoke": {
                    k: v
                    for k, v in smoke_expectation(
                        out, report.get("task", ""), model.max_length, adapter=adapter["file"]
                    ).items()
                    if k in ("output", "shape", "argmax")
                },
            }
            for adapter in adapters
        ]
    manifest["runtime_files"] = task.write_runtime_files(out)  # e.g. genai_config.json for decoders
    (out / README).write_text(render_readme(manifest, task.release_snippet()), encoding="utf-8")
    manifest["files"] = mf.hash_folder(out, exclude=(MANIFEST,))
    mf.write_json(out / MANIFEST, manifest)
    return manifest


def _copy_adapters(source: Path, out: Path) -> list[dict[str, Any]]:
    """Copy a variant's LoRA adapters (adapters.json + adapters/*.onnx_adapter); their entries."""
    index = source / "adapters.json"
    if not index.is_file():
        return []
    shutil.copy2(index, out / index.name)
    shutil.copytree(source / "adapters", out / "adapters", dirs_exist_ok=True)
    entries = json.loads(index.read_text(encoding="utf-8"))["adapters"]
    return [{k: a[k] for k in ("name", "file", "sha256", "perplexity") if k in a} for a in entries]


def render_readme(manifest: dict[str, Any], snippet: str) -> str:
    """The bundle's README.md from templates/README.md.j2 (plain text: no autoescaping in Markdown)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(
        loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, keep_trailing_newline=True
    )
    return env.get_template("README.md.j2").render(m=manifest, snippet=snippet.strip("\n"))
