"""Command line: python -m pipeline run|check|list|verify|gate|bench ...

Exit codes: 0 ok, 1 stage failure, 2 bad input (recipe, paths, model, data), 3 gate failure,
4 gate inconclusive (a speed interval straddles its limit, or the timing was interfered with).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.errors import PipelineError, RecipeError

log = logging.getLogger("pipeline")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run recipes' stages (cached) and write their outputs")
    run.add_argument("recipes", type=Path, nargs="+", metavar="RECIPE", help="recipe YAML file(s)")
    run.add_argument("--force", action="store_true", help="re-run every stage, ignoring the cache")
    run.add_argument("--until", metavar="STAGE", help="stop each variant after this stage")
    run.add_argument(
        "--revalidate",
        action="store_true",
        help="measure accuracy and speed again even when nothing changed (stages stay cached)",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set finetune.epochs=1 (repeatable)",
    )
    run.add_argument("--exported", type=Path, default=Path("exported"), help="output root folder")
    run.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where the stages run: this process (default) or Ray tasks (pip install '.[ray]')",
    )
    run.add_argument(
        "--address",
        metavar="ray://HOST:PORT|auto",
        help="the Ray cluster to run on (--executor ray); without it a local Ray instance is started",
    )

    check = sub.add_parser("check", help="validate recipes; exit 2 on the first invalid one")
    check.add_argument("recipes", type=Path, nargs="+", help="recipe YAML files")

    sub.add_parser("list", help="list the registered stages")

    verify = sub.add_parser("verify", help="check a release bundle: hashes, files, smoke run (no torch)")
    verify.add_argument("folder", type=Path, help="e.g. exported/<recipe>/release")

    bench = sub.add_parser(
        "bench",
        help="time and score the recipe's variants beside PyTorch, torch INT8 and Optimum "
        "(writes OUT/RESULTS.md and OUT/results/<recipe>.json)",
    )
    bench.add_argument("recipe", type=Path, help="recipe YAML file (run first; cached stages are reused)")
    bench.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field (repeatable)",
    )
    bench.add_argument("--exported", type=Path, default=Path("exported"), help="output root folder")
    bench.add_argument("--out", type=Path, default=Path("benchmarks"), help="where results are written")
    bench.add_argument("--iters", type=int, default=100, help="timed runs per candidate and shape")
    bench.add_argument("--settle", type=int, default=2, help="untimed runs opening every turn")
    bench.add_argument("--warmup", type=int, default=10, help="untimed runs per candidate and shape")
    bench.add_argument(
        "--block", type=int, default=20, help="consecutive timed runs of one candidate per turn"
    )

    gpu = sub.add_parser(
        "gpu-check",
        help="run the recipe's built variants on the CUDA provider: placement, agreement, p50 (one table)",
    )
    gpu.add_argument("recipe", type=Path, help="recipe YAML file (run first)")
    gpu.add_argument("--exported", type=Path, default=Path("exported"), help="output root folder")

    gate = sub.add_parser("gate", help="check a recipe's report against its gates (exit 3 on failure)")
    from pipeline.gate import add_gate_arguments

    add_gate_arguments(gate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    for noisy in ("transformers", "optimum", "onnxruntime", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return _COMMANDS[args.command](args)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def _cmd_run(args: argparse.Namespace) -> int:
    """Every recipe is prepared (checked) before the first stage runs; one that fails does not stop
    the others; the exit code is the first failing recipe's (in command-line order)."""
    from pipeline.config import load_recipe
    from pipeline.executors import get_executor
    from pipeline.runner import Runner

    executor = get_executor(args.executor, args.address)
    recipes = [load_recipe(path, args.overrides) for path in args.recipes]
    names = [recipe.name for recipe in recipes]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise RecipeError(f"recipe name {twice[0]!r} given twice (each recipe owns exported/<name>/)")
    runners = [
        Runner(recipe, exported=args.exported, force=args.force, until=args.until, revalidate=args.revalidate)
        for recipe in recipes
    ]
    several = len(runners) > 1
    code = 0
    for outcome in executor.run(runners):
        if outcome.error is not None:
            prefix = f"{outcome.recipe}: " if several else ""
            print(f"error: {prefix}{outcome.error}", file=sys.stderr)
            code = code or outcome.error.exit_code
            continue
        result = outcome.result
        log.info(
            "recipe %s: %d stage(s) ran, %d cached; outputs in %s",
            outcome.recipe,
            len(result.ran),
            len(result.cached),
            result.plan.root,
        )
        for name, why in result.failed.items():
            prefix = f"{outcome.recipe}: " if several else ""
            print(f"error: {prefix}variant {name} failed: {why}", file=sys.stderr)
            code = code or 1
    return code


def _cmd_check(args: argparse.Namespace) -> int:
    from pipeline.config import load_recipe

    failed = 0
    for path in args.recipes:
        try:
            recipe = load_recipe(path)
        except RecipeError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"ok: {path} ({recipe.name}: {recipe.model.task}, variants {', '.join(recipe.variants)})")
    return 2 if failed else 0


def _cmd_list(args: argparse.Namespace) -> int:
    from pipeline.stages.registry import all_stages

    for name, spec in sorted(all_stages().items()):
        print(f"{name:10s} {spec.consumes}->{spec.produces}  {spec.description}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.release import verify_command

    return verify_command(args.folder)


def _cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.peers import run_benchmark

    if min(args.iters, args.block) < 1 or min(args.warmup, args.settle) < 0:
        raise RecipeError(
            f"bench: --iters and --block must be >= 1, --warmup and --settle >= 0 (got "
            f"{args.iters}, {args.block}, {args.warmup}, {args.settle})"
        )
    result = run_benchmark(
        args.recipe,
        args.overrides,
        args.exported,
        args.out,
        args.iters,
        args.warmup,
        args.block,
        args.settle,
    )
    log.info("bench: %s written (%d candidates)", args.out / "RESULTS.md", len(result["candidates"]))
    return 0


def _cmd_gate(args: argparse.Namespace) -> int:
    from pipeline.gate import gate_command

    return gate_command(args.recipe, args.baseline, args.junit, args.exported, args.overrides)


def _cmd_gpu_check(args: argparse.Namespace) -> int:
    from pipeline.gpu_check import gpu_check

    return gpu_check(args.recipe, args.exported)


_COMMANDS = {
    "run": _cmd_run,
    "check": _cmd_check,
    "list": _cmd_list,
    "verify": _cmd_verify,
    "gate": _cmd_gate,
    "bench": _cmd_bench,
    "gpu-check": _cmd_gpu_check,
}
