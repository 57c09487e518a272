"""Tiny models, ONNX variants, recipes and crafted reports for the validate/report/gate/release tests.

Everything is built from configs (fixtures_tiny: a 2-layer BERT with hidden size 32 over a ~130-word
vocab), exported with the legacy TorchScript exporter and dynamically quantized with ONNX Runtime,
so one full validation of two variants takes a few seconds on 2 cores.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from fixtures_tiny import make_ner_examples, make_text_examples, make_tiny_bert

NER_LABELS = ["O", "B-LOC", "B-PER"]
CLS_LABELS = ["neg", "pos"]
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def export_onnx(hf_dir: Path, onnx_dir: Path, task: str) -> Path:
    """hf_dir -> onnx_dir/model.onnx (+ config and tokenizer files), dynamic batch and sequence."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    from pipeline.onnx.io import copy_metadata

    auto = {
        "token-classification": AutoModelForTokenClassification,
        "text-classification": AutoModelForSequenceClassification,
        "feature-extraction": AutoModel,
    }[task]
    model = auto.from_pretrained(str(hf_dir)).eval()
    output = "last_hidden_state" if task == "feature-extraction" else "logits"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in (*INPUT_NAMES, output)}
    if task == "text-classification":
        axes[output] = {0: "batch_size"}
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(onnx_dir / "model.onnx"),
            input_names=list(INPUT_NAMES),
            output_names=[output],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    copy_metadata(hf_dir, onnx_dir)
    return onnx_dir


def quantize_dynamic(onnx_dir: Path, out_dir: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from pipeline.onnx.io import copy_metadata

    out_dir.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(onnx_dir / "model.onnx"),
        str(out_dir / "model.onnx"),
        per_channel=True,
        weight_type=QuantType.QInt8,
    )
    copy_metadata(onnx_dir, out_dir)
    return out_dir


def build_variants(root: Path, task: str = "token-classification") -> dict[str, Any]:
    """{hf, variants: {fp32, int8}, examples} for `task` under root."""
    labels = {"token-classification": NER_LABELS, "text-classification": CLS_LABELS}.get(task)
    hf = make_tiny_bert(root / "hf", task, labels=labels)
    if task == "token-classification":
        examples = make_ner_examples(24, seed=1)
    else:
        examples = make_text_examples(24, seed=1)
    fp32 = export_onnx(hf, root / "fp32" / "export", task)
    int8 = quantize_dynamic(fp32, root / "int8" / "quantize")
    return {"hf": hf, "variants": {"fp32": fp32, "int8": int8}, "examples": examples}


def recipe_for(hf: Path, task: str = "token-classification", **sections: Any):
    """A validated Recipe for the tiny model with small latency settings."""
    from pipeline.config import recipe_from_dict

    document: dict[str, Any] = {
        "name": "tiny-validate",
        "model": {"source": str(hf), "task": task, "max_length": 32},
        "variants": {"fp32": [], "int8": [{"quantize": {"mode": "dynamic"}}]},
        "validate": {
            "latency": {"batch_sizes": [1, 2], "seq_lens": [8, 16], "warmup": 1, "iters": 4, "threads": 1},
            "eval_batch_size": 5,
        },
    }
    for key, value in sections.items():
        document[key] = value
    return recipe_from_dict(copy.deepcopy(document))


def stage_manifests(fused: bool = False, unstructured: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Crafted stage manifests like the runner's (only the keys validate/release read)."""
    export = {"stage": "export", "config": {"opset": 17}, "cache_key": "k-export", "data": {}, "metrics": {}}
    quantize = {
        "stage": "quantize",
        "config": {"mode": "dynamic"},
        "cache_key": "k-quant",
        "data": {"calibration": "c" * 64},
        "metrics": {"mode": "dynamic"},
        "versions": {"onnxruntime": "x"},
    }
    chain = [export]
    if unstructured:
        chain = [
            {
                "stage": "prune",
                "config": {"kind": "unstructured", "amount": 0.5},
                "metrics": {"kind": "unstructured", "sparsity": 0.5, "history": [1, 2, 3]},
            },
            export,
        ]
    if fused:
        chain = chain + [
            {
                "stage": "optimize",
                "config": {},
                "metrics": {
                    "attention_fused": 2,
                    "expected_fusion": {"Attention": 2},
                    "attention_fusion_complete": True,
                },
            }
        ]
    return {"fp32": list(chain), "int8": chain + [quantize]}


def validate_into(
    recipe: Any, variants: dict[str, Path], hf: Path, data: Any, manifests: dict, out: Path
) -> dict:
    """The validate stage, then the runner's decisions, the report written into `out`: the report."""
    import logging

    from pipeline.report import write_report
    from pipeline.runner import decide
    from pipeline.stages.registry import run_stage
    from pipeline.stages.validate import load_measurements

    measured = out.parent / f"{out.name}-measured"
    run_stage(
        "validate",
        recipe.validate_,
        hf,
        measured,
        model=recipe.model,
        data=data,
        variants={name: (folder, manifests.get(name, [])) for name, folder in variants.items()},
        log=logging.getLogger("test"),
    )
    report = decide(recipe, load_measurements(measured))
    out.mkdir(parents=True, exist_ok=True)
    write_report(report, out)
    return report


def run_validation(root: Path, task: str = "token-classification", **sections: Any) -> dict[str, Any]:
    """Build the variants, validate them into root/'report', return everything a test needs."""
    from pipeline.data import DataBundle

    built = build_variants(root, task)
    recipe = recipe_for(built["hf"], task, **sections)
    data = DataBundle.from_examples(task, eval=built["examples"])
    out = root / "report"
    manifests = stage_manifests()
    report = validate_into(recipe, built["variants"], built["hf"], data, manifests, out)
    return {**built, "recipe": recipe, "report": report, "out": out, "manifests": manifests, "data": data}


# -- crafted reports (no model needed) ---------------------------------------------------------------


def latency(p50: float) -> dict[str, float]:
    return {
        "p50_ms": p50,
        "p90_ms": p50 * 1.1,
        "p99_ms": p50 * 1.3,
        "mean_ms": p50,
        "throughput_per_s": 1000 / p50,
    }


def crafted_report(**changes: Any) -> dict[str, Any]:
    """A small, valid report: PyTorch + two variants, f1 metric, shapes b1_s64 and b8_s64."""
    report: dict[str, Any] = {
        "format_version": 1,
        "recipe": "tiny-validate",
        "task": "token-classification",
        "metric_name": "f1",
        "machine": {"cpu_model": "test CPU", "cores": 2, "flags": {"avx2": True}},
        "settings": {"primary_latency_key": "b1_s64", "latency": {"threads": 2}, "eval_examples": 10},
        "providers": {
            "CPUExecutionProvider": "used",
            "CUDAExecutionProvider": "not available on this machine (no GPU)",
        },
        "baseline": {"metric": 0.42, "latency": {"b1_s64": latency(40.0), "b8_s64": latency(200.0)}},
        "variants": {
            "fp32": {
                "metric": 0.42,
                "metric_drop": 0.0,
                "agreement": 1.0,
                "latency": {"b1_s64": latency(10.0), "b8_s64": latency(80.0)},
                "speedup_vs_pytorch": {"b1_s64": 4.0, "b8_s64": 2.5},
                "size_bytes": 90_000_000,
                "stages": [],
                "providers": {
                    "CPUExecutionProvider": {"status": "ok", "session_providers": ["CPUExecutionProvider"]}
                },
                "attention_fusion": None,
            },
            "int8": {
                "metric": 0.412,
                "metric_drop": 0.008,
                "agreement": 0.98,
                "latency": {"b1_s64": latency(6.0), "b8_s64": latency(40.0)},
                "speedup_vs_pytorch": {"b1_s64": 6.6667, "b8_s64": 5.0},
                "size_bytes": 23_000_000,
                "stages": [],
                "providers": {
                    "CPUExecutionProvider": {"status": "ok", "session_providers": ["CPUExecutionProvider"]},
                    "CUDAExecutionProvider": {"status": "not available on this machine", "reason": "no GPU"},
                },
                "attention_fusion": {"fused": 5, "expected": 6, "complete": False},
            },
        },
        "pareto": ["int8", "fp32"],
        "release": {"variant": "int8", "reason": "fastest within all gates"},
        "gates": {},
        "notes": [],
    }
    for key, value in changes.items():
        report[key] = value
    return report


def write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return path


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


_VALIDATED: dict[str, dict[str, Any]] = {}


def validated_once(
    tmp_path_factory: Any, task: str = "token-classification", **sections: Any
) -> dict[str, Any]:
    """One validation per task for the whole test session (shared by the validate/release tests)."""
    if task not in _VALIDATED:
        _VALIDATED[task] = run_validation(tmp_path_factory.mktemp(f"validated-{task}"), task, **sections)
    return _VALIDATED[task]


def build_bundle(recipe: Any, report: dict, variants: dict, manifests: dict, out: Path) -> dict | None:
    """The release bundle of `report` for `recipe` (what the runner does after the decisions)."""
    from pipeline.release import build_release
    from pipeline.tasks import get_task

    return build_release(
        report, variants, manifests, out, model=recipe.model, task=get_task(recipe.model.task)
    )


def run_readme_snippet(bundle: Path, tmp_path: Path) -> Any:
    """Run the README's onnxruntime-only snippet in `bundle`, asserting torch/transformers stay unloaded."""
    import re
    import subprocess
    import sys

    readme = (bundle / "README.md").read_text()
    snippet = re.search(
        r"## Inference with onnxruntime and tokenizers only\n\n```python\n(.*?)```", readme, re.S
    )
    assert snippet, readme
    script = tmp_path / "snippet.py"
    script.write_text(
        snippet.group(1)
        + "\nimport sys\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    return subprocess.run(
        [sys.executable, str(script)], cwd=bundle, capture_output=True, text=True, timeout=120
    )
