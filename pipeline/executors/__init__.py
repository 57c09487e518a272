"""Executors: where the runner's stage nodes run, for one or several recipes.

- `local` (the default): every node in this process, recipe after recipe, in plan order; exactly
  what `Runner.run()` does.
- `ray`: every node is a Ray task (`pip install '.[ray]'`); dependencies are the parents' object
  refs, resource requests come from the stage's threads, validation takes a node's whole `timing`
  resource. Outputs, manifests and cache keys are the same as a local run's (pipeline.executors.ray_executor).

Both first prepare every recipe (model, data, preflight, plan, lock): bad input in any of them exits
2 before the first stage runs. A recipe that fails does not stop the others; an OutputError (disk
full, no permission) stops the run, since every later stage would fail the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pipeline.errors import PipelineError, RecipeError

if TYPE_CHECKING:
    from pipeline.plan import Plan
    from pipeline.runner import Runner, RunResult

EXECUTORS = ("local", "ray")


@dataclass
class RecipeOutcome:
    """One recipe's end: its result, or the error that stopped it (its exit code)."""

    recipe: str
    result: RunResult | None = None
    error: PipelineError | None = None


class Executor(Protocol):
    name: str

    def run(self, runners: list[Runner]) -> list[RecipeOutcome]: ...


def get_executor(name: str, address: str | None = None, **options) -> Executor:
    """The executor called `name` ("local" or "ray"); RecipeError (exit 2) for anything it lacks."""
    if name == "local":
        if address is not None:
            raise RecipeError("--address is for --executor ray (the local executor runs in this process)")
        from pipeline.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from pipeline.executors.ray_executor import RayExecutor

        return RayExecutor(address, **options)
    raise RecipeError(f"unknown executor {name!r}; expected one of {', '.join(EXECUTORS)}")


def prepare_all(runners: list[Runner]) -> list[Plan]:
    """Prepare every recipe (preflight, plan, lock) before any stage runs; on a failure release the
    locks already taken and raise it."""
    plans: list[Plan] = []
    try:
        for runner in runners:
            plans.append(runner.prepare())
    except BaseException:
        release_all(runners)
        raise
    return plans


def release_all(runners: list[Runner]) -> None:
    for runner in runners:
        runner.release_lock()
