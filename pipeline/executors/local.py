"""The local executor: every node in this process, in plan order, recipe after recipe."""

from __future__ import annotations

from pipeline.errors import OutputError, PipelineError
from pipeline.executors import RecipeOutcome, prepare_all, release_all
from pipeline.runner import Runner


class LocalExecutor:
    """What `Runner.run()` does, for each recipe in turn (all of them prepared first)."""

    name = "local"

    def run(self, runners: list[Runner]) -> list[RecipeOutcome]:
        plans = prepare_all(runners)
        outcomes: list[RecipeOutcome] = []
        try:
            for runner, plan in zip(runners, plans, strict=True):
                try:
                    runner.conclude(plan, runner.run_nodes(plan))
                    if runner.wants_validation():
                        runner.validate_and_release(plan)
                except OutputError:
                    raise  # the disk or its permissions: every later recipe would fail the same way
                except PipelineError as err:
                    outcomes.append(RecipeOutcome(runner.recipe.name, error=err))
                    continue
                outcomes.append(RecipeOutcome(runner.recipe.name, result=runner.result(plan)))
        finally:
            release_all(runners)
        return outcomes
