"""The Ray executor: the stage nodes of one or several recipes as Ray tasks on a cluster.

The driver (this process) prepares every recipe as a local run does (model, data, preflight, plan,
lock; bad input exits 2 before anything runs), then submits one task per selected node. A task's
dependency is its parent's ObjectRef, so a chain runs in order and independent chains (variants,
recipes) run side by side. Inside the task the runner's own code runs: the cache lookup, the stage,
the manifest and the atomic rename into `exported/<recipe>/<variant>/<stage>/`. Cache keys and
manifests are therefore those of a local run, and a local run afterwards finds everything cached.
`exported/` (and the model and data paths of the recipes) must be the same path on every node: a
shared filesystem.

Resources: a stage task asks for as many CPUs as the threads it runs with (torch's intra-op threads
of a local run in this environment, which the task sets, so that its numerics are those of a local
run); validation (and the search, which also times) asks for `validate.latency.threads` CPUs, one
GPU when the recipe validates on CUDAExecutionProvider and the cluster has one, and the node's
whole `timing` resource. Every node offers `timing: 1`; every stage task holds a sliver of it
(TIMING_SLIVER), so a timing task starts only on a node where no other pipeline task runs, and no
pipeline task starts beside it until it ends.

Failures: a stage failure fails its node; its descendants are skipped and every variant through it
is reported with the same one-line error as a local run; the other branches finish. A worker that
dies (killed, out of memory, node lost) is retried `max_retries` times by Ray, then fails its node
the same way. Nothing partial is ever published: a dead task leaves at most a `.tmp-*` folder,
removed when the run ends (the recipe's lock is still held) or by the next run.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from pipeline.errors import OutputError, PipelineError, RecipeError, StageError, first_line
from pipeline.executors import RecipeOutcome, prepare_all, release_all
from pipeline.plan import Node, Plan
from pipeline.runner import Runner, _remove_leftovers

log = logging.getLogger("pipeline")

INSTALL_HINT = "pip install '.[ray]' (or pip install ray==2.60.0)"
TIMING = "timing"  # the custom resource every node offers once: {"timing": 1}
TIMING_SLIVER = 0.001  # what a non-timing task holds of it (up to 1000 such tasks per node)
_NOISY = ("transformers", "optimum", "onnxruntime", "urllib3", "filelock", "huggingface_hub")


@dataclass
class Outcome:
    """What a task returns: the node's status and manifest, or its error (never raised)."""

    status: str  # ran | cached | failed | skipped
    manifest: dict[str, Any] | None = None
    error: PipelineError | None = None
    seconds: float = 0.0
    failed: dict[str, str] | None = None  # the finish task: variants without an artifact


def _import_ray() -> Any:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every worker's log line, not "[repeated 2x]"
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in CI logs
    try:
        import ray
    except ImportError:
        raise RecipeError(f"--executor ray: the ray package is not installed; {INSTALL_HINT}") from None
    return ray


class RayExecutor:
    """Runs every recipe's nodes as Ray tasks (see the module docstring)."""

    name = "ray"

    def __init__(self, address: str | None = None, *, max_retries: int = 1, num_cpus: int | None = None):
        self.ray = _import_ray()
        self.address = address
        self.max_retries = max_retries
        self.num_cpus = num_cpus  # of the local instance started without an address (default: all)

    # -- the cluster ------------------------------------------------------------------------------

    def _connect(self) -> bool:
        """Join the cluster (or start a local instance); True when this call started it."""
        ray = self.ray
        if ray.is_initialized():  # the caller's own instance (tests, notebooks): used as it is
            started = False
        else:
            options: dict[str, Any] = {
                "include_dashboard": False,
                "logging_level": logging.WARNING,
                "log_to_driver": True,
            }
            try:
                if self.address is None:
                    ray.init(
                        num_cpus=self.num_cpus or os.cpu_count(),
                        resources={TIMING: 1},
                        _node_ip_address="127.0.0.1",
                        **options,
                    )
                else:
                    ray.init(address=self.address, **options)
            except Exception as err:  # no cluster there, version mismatch, refused connection
                where = self.address or "a new local instance"
                raise RecipeError(
                    f"--executor ray: cannot start or join Ray at {where}: {type(err).__name__}: "
                    f"{first_line(err)}"
                ) from None
            started = True
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.node_cpus = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
        self.gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
        if not any(n["Resources"].get(TIMING, 0) >= 1 for n in nodes) or self.node_cpus < 1:
            if started:
                ray.shutdown()
            raise RecipeError(
                f"--executor ray: no node of the Ray cluster offers the '{TIMING}' resource (and a CPU); "
                f"start every node with ray start ... --resources='{{\"{TIMING}\": 1}}'"
            )
        return started

    # -- the run ----------------------------------------------------------------------------------

    def run(self, runners: list[Runner]) -> list[RecipeOutcome]:
        plans = prepare_all(runners)
        started = False
        try:
            started = self._connect()
            schedule = _Schedule(self, runners, plans)
            try:
                outcomes = schedule.run()
            except BaseException:
                for ref in schedule.pending:  # interrupted: no task of ours outlives the lock
                    self.ray.cancel(ref, force=True)
                raise
            for plan in plans:
                _remove_leftovers(plan.root)  # a dead task's .tmp-* (every task has ended)
            return outcomes
        except OutputError:
            for plan in plans:
                _remove_leftovers(plan.root)
            raise
        finally:
            release_all(runners)
            if started:
                self.ray.shutdown()


class _Schedule:
    """The driver's bookkeeping for one run: submissions, outcomes, per-recipe completion."""

    def __init__(self, executor: RayExecutor, runners: list[Runner], plans: list[Plan]):
        import torch

        self.executor, self.ray = executor, executor.ray
        self.runners, self.plans = runners, plans
        self.cwd = os.getcwd()
        self.level = log.getEffectiveLevel()
        # The intra-op threads a local run uses here; a stage task runs with as many, and asks for
        # as many CPUs (no more than the largest node has).
        self.threads = torch.get_num_threads()
        self.stage_task = self.ray.remote(_stage_task)
        self.finish_task = self.ray.remote(_finish_task)
        self.refs: dict[int, Any] = {}  # id(node) -> ObjectRef of its outcome
        self.pending: dict[Any, tuple[int, Node | None]] = {}  # ref -> (recipe index, node | None: finish)
        self.states: dict[int, Any] = {}
        self.settled: list[int] = [0] * len(runners)
        self.first_error: list[StageError | None] = [None] * len(runners)
        self.fatal: list[PipelineError | None] = [None] * len(runners)
        self.spent: list[float] = [0.0] * len(runners)
        self.outcomes: dict[int, RecipeOutcome] = {}
        self.children: dict[int, list[Node]] = {}
        for runner in runners:
            for node in runner.selected:
                if node.parent is not None:
                    self.children.setdefault(id(node.parent), []).append(node)

    def run(self) -> list[RecipeOutcome]:
        for r, runner in enumerate(self.runners):
            self.states[r] = self.ray.put((runner, self.plans[r]))
            for node in runner.selected:
                if node.parent is None or not self._lazy(r, node):
                    self._submit(r, node)
            self._maybe_finish(r)
        output_error: OutputError | None = None
        while self.pending:
            first, _ = self.ray.wait(list(self.pending), num_returns=1)
            more, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            ready = set(first) | set(more)
            # Parents before children: a child is never ready before its parent.
            order = {ref: self._order(*self.pending[ref]) for ref in ready}
            for ref in sorted(ready, key=order.__getitem__):
                r, node = self.pending.pop(ref)
                outcome = self._get(r, node, ref)
                if node is None:
                    self._finished(r, outcome)
                    continue
                self._apply(r, node, outcome)
                if isinstance(outcome.error, OutputError):
                    output_error = output_error or outcome.error
                self._maybe_finish(r)
        if output_error is not None:
            raise output_error  # as a local run: the disk or its permissions stop everything
        return [self.outcomes[r] for r in range(len(self.runners))]

    def _order(self, r: int, node: Node | None) -> tuple[int, int]:
        runner = self.runners[r]
        return (r, len(runner.selected) if node is None else runner.selected.index(node))

    # -- submissions ------------------------------------------------------------------------------

    def _lazy(self, r: int, node: Node) -> bool:
        """Search candidates under a time budget start only once their parent is done and the
        budget is not spent (as in a local run, the budget is checked before a node starts)."""
        search = self.runners[r].recipe.search
        budgeted = bool(search and search.max_seconds is not None)
        return budgeted and self.plans[r].candidate_only(node)

    def _submit(self, r: int, node: Node) -> None:
        runner, plan = self.runners[r], self.plans[r]
        parent = self.refs.get(id(node.parent)) if node.parent is not None else None
        task = self.stage_task.options(
            name=f"pipeline:{runner.recipe.name}/{node.folder.relative_to(plan.root)}",
            max_retries=self.executor.max_retries,
            **stage_resources(self.threads, self.executor.node_cpus),
        )
        ref = task.remote(
            self.states[r], runner.selected.index(node), runner.label(plan, node), self._env(), parent
        )
        self.refs[id(node)] = ref
        self.pending[ref] = (r, node)

    def _env(self) -> dict[str, Any]:
        return {"cwd": self.cwd, "level": self.level, "threads": self.threads}

    def _submit_finish(self, r: int) -> None:
        runner, plan = self.runners[r], self.plans[r]
        task = self.finish_task.options(
            name=f"pipeline:{runner.recipe.name}/validate",
            max_retries=self.executor.max_retries,
            **timing_resources(runner.recipe, self.threads, self.executor.node_cpus, self.executor.gpus),
        )
        ref = task.remote(self.ray.put((runner, plan)), self._env())
        self.pending[ref] = (r, None)

    # -- outcomes ---------------------------------------------------------------------------------

    def _get(self, r: int, node: Node | None, ref: Any) -> Outcome:
        """The task's outcome; a task that Ray could not run to its end (a dead worker, a lost
        node) becomes that node's one-line StageError, or a skip when its parent already failed."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            if node is not None and Runner.blocked(node):
                return Outcome("skipped")
            runner, plan = self.runners[r], self.plans[r]
            what = (
                f"{runner.label(plan, node)}: {node.stage}"
                if node is not None
                else "validation measurements: validate"
            )
            cause = err.cause if isinstance(err, self.ray.exceptions.RayTaskError) and err.cause else err
            return Outcome(
                "failed", error=StageError(f"{what} failed: {type(cause).__name__}: {first_line(cause)}")
            )

    def _apply(self, r: int, node: Node, outcome: Outcome) -> None:
        runner, plan = self.runners[r], self.plans[r]
        self.settled[r] += 1
        if plan.candidate_only(node):
            self.spent[r] += outcome.seconds
        if outcome.status == "skipped":
            node.status = "skipped"
        elif outcome.status == "failed":
            error = outcome.error
            if isinstance(error, StageError) and not isinstance(error, OutputError):
                self.first_error[r] = self.first_error[r] or error
                runner.record_failure(node, error)
            else:  # bad input found while running, or the disk: the recipe stops, as locally
                node.status = "failed"
                self.fatal[r] = self.fatal[r] or error
        else:
            node.status, node.manifest = outcome.status, outcome.manifest
            runner.record_done(node, plan)
        for child in self.children.get(id(node), []):
            if id(child) not in self.refs and self._lazy(r, child):
                self._release_lazy(r, child)

    def _release_lazy(self, r: int, node: Node) -> None:
        """Submit a budgeted candidate node whose parent is done, or skip it (and its subtree)."""
        runner = self.runners[r]
        budget = runner.recipe.search.max_seconds
        if self.fatal[r] is None and not Runner.blocked(node) and self.spent[r] <= budget:
            self._submit(r, node)
            return
        if self.fatal[r] is None and not Runner.blocked(node):
            runner.skip_over_budget(node, budget)
        else:
            node.status = "skipped"
        self.settled[r] += 1
        for child in self.children.get(id(node), []):
            self._release_lazy(r, child)

    def _maybe_finish(self, r: int) -> None:
        """When every node of recipe r is settled: its index, then validation (a timing task)."""
        runner, plan = self.runners[r], self.plans[r]
        if r in self.outcomes or self.settled[r] < len(runner.selected):
            return
        if any(pending_r == r for pending_r, _ in self.pending.values()):
            return  # the finish task is already submitted
        if self.fatal[r] is not None:
            self.outcomes[r] = RecipeOutcome(runner.recipe.name, error=self.fatal[r])
            return
        try:
            runner.conclude(plan, self.first_error[r])
        except PipelineError as err:
            self.outcomes[r] = RecipeOutcome(runner.recipe.name, error=err)
            return
        if runner.wants_validation():
            self._submit_finish(r)
        else:
            self.outcomes[r] = RecipeOutcome(runner.recipe.name, result=runner.result(plan))

    def _finished(self, r: int, outcome: Outcome) -> None:
        runner, plan = self.runners[r], self.plans[r]
        if outcome.error is not None:
            self.outcomes[r] = RecipeOutcome(runner.recipe.name, error=outcome.error)
            return
        runner.failed = dict(outcome.failed or {})
        self.outcomes[r] = RecipeOutcome(runner.recipe.name, result=runner.result(plan))


# -- resource requests ----------------------------------------------------------------------------


def stage_resources(threads: int, node_cpus: float) -> dict[str, Any]:
    """A stage task: as many CPUs as the threads it runs with (no more than the largest node has)
    and a sliver of its node's `timing` resource."""
    return {"num_cpus": max(1, min(threads, int(node_cpus))), "resources": {TIMING: TIMING_SLIVER}}


def timing_resources(recipe: Any, threads: int, node_cpus: float, gpus: float) -> dict[str, Any]:
    """Validation (and the search): validate.latency.threads CPUs (at least the stage threads, for
    its accuracy passes), a GPU when it validates on CUDA and the cluster has one, and the node's
    whole `timing` resource: it starts only where no other pipeline task runs, and none starts
    beside it."""
    cpus = max(1, min(max(recipe.validate_.latency.threads, threads), int(node_cpus)))
    cuda = "CUDAExecutionProvider" in recipe.validate_.providers and gpus >= 1
    return {"num_cpus": cpus, "num_gpus": 1 if cuda else 0, "resources": {TIMING: 1}}


# -- what runs in the workers ---------------------------------------------------------------------


def _in_worker(env: dict[str, Any]) -> None:
    """The driver's working directory (relative recipe paths), its log level, a local run's threads."""
    import torch

    os.chdir(env["cwd"])
    torch.set_num_threads(env["threads"])
    logger = logging.getLogger("pipeline")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(env["level"])
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _on_this_machine(runner: Runner) -> None:
    """Machine facts (cache keys, manifests) are those of the node the task runs on."""
    from pipeline.fingerprint import machine_fingerprint

    runner.machine = machine_fingerprint()


def _stage_task(
    state: tuple[Runner, Plan], index: int, label: str, env: dict[str, Any], parent: Any
) -> Outcome:
    """One node: its cache lookup or its stage, manifest and atomic publication (Runner code)."""
    clock = time.perf_counter()
    runner, plan = state
    node = runner.selected[index]
    if parent is not None:
        if parent.status in ("failed", "skipped"):
            return Outcome("skipped")
        node.parent.status, node.parent.manifest = parent.status, parent.manifest
    _in_worker(env)
    _on_this_machine(runner)
    try:
        runner.execute_node(node, plan, label)
    except PipelineError as err:
        return Outcome("failed", error=err, seconds=time.perf_counter() - clock)
    except Exception as err:  # outside the stage call (a config the stage refuses): one line too
        error = StageError(f"{label}: {node.stage} failed: {type(err).__name__}: {first_line(err)}")
        return Outcome("failed", error=error, seconds=time.perf_counter() - clock)
    return Outcome(node.status, manifest=node.manifest, seconds=time.perf_counter() - clock)


def _finish_task(state: tuple[Runner, Plan], env: dict[str, Any]) -> Outcome:
    """Validation (and the search), decisions, report and release of one recipe."""
    runner, plan = state
    _in_worker(env)
    _on_this_machine(runner)
    try:
        runner.validate_and_release(plan)
    except PipelineError as err:
        return Outcome("failed", error=err)
    return Outcome("ran", failed=dict(runner.failed))


__all__ = ["INSTALL_HINT", "TIMING", "TIMING_SLIVER", "RayExecutor", "stage_resources", "timing_resources"]
