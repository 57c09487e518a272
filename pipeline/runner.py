"""The runner: turns a recipe into a DAG of stage runs, caches them by content, publishes atomically.

Each variant is a chain: source model -> [finetune] -> [prune...] -> export -> [optimize/quantize...].
Variants that share a prefix share its nodes; each node runs once. A node's output folder is
`exported/<recipe>/<variant>/<stage>/`, owned by the first variant (in recipe order) that uses it.
After every chain, the validate stage measures all variants (`exported/<recipe>/validate/`); the
runner then takes the decisions (gates, release pick), writes the report and the release bundle.

A stage receives its own section plus what it declares it reads (pipeline.stages.registry), and
its cache key is sha256 over exactly that: stage, config as applied, the upstream output's content
digest, the data digests of its declared splits, its declared sections and machine facts, the
recipe's model section (task, max_length, trust_remote_code) and the package versions. A node whose
manifest carries the same key and whose files still match their recorded hashes is skipped.

Writes are atomic: a stage writes into `.tmp-*` beside its target; only a finished stage is renamed
into place, with its manifest. A lock file keeps two runs of one recipe from writing at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from pipeline import manifest as mf
from pipeline.config import Recipe, canonical_json
from pipeline.errors import OutputError, PipelineError, RecipeError, StageError, first_line
from pipeline.plan import Node, Plan, build_plan
from pipeline.release.decide import decide, read_report, release_intact, write_report_files
from pipeline.stages.registry import StageContext, StageSpec, get_stage

log = logging.getLogger("pipeline")


@dataclass
class RunResult:
    plan: Plan
    ran: list[str]
    cached: list[str]
    failed: dict[str, str] = field(default_factory=dict)  # variant -> error (exit code 1)


class Runner:
    """Runs a plan: cache lookups, stage calls, manifests, atomic publication, the recipe lock."""

    def __init__(
        self,
        recipe: Recipe,
        exported: Path = Path("exported"),
        force: bool = False,
        until: str | None = None,
        revalidate: bool = False,
    ):
        self.recipe = recipe
        self.exported = Path(exported)
        self.force = force
        self.revalidate = revalidate
        self.until = until
        if until is not None:
            get_stage(until)  # unknown name -> RecipeError listing the known stages

    def run(self) -> RunResult:
        """Run every selected node in plan order in this process, then validate and release."""
        plan = self.prepare()
        try:
            first_error = self.run_nodes(plan)
            self.conclude(plan, first_error)
            if self.wants_validation():
                self.validate_and_release(plan)
            return self.result(plan)
        finally:
            self.release_lock()

    # The phases of a run, in order; an executor (pipeline.executors) may run the nodes elsewhere.

    def prepare(self) -> Plan:
        """Resolve the model, read the data, preflight (nothing written before), lay out the plan,
        take the recipe's lock and remove what a killed run left behind."""
        from pipeline.data import DataBundle
        from pipeline.fingerprint import machine_fingerprint
        from pipeline.model_source import resolve_model_source
        from pipeline.preflight import preflight
        from pipeline.tasks import get_task

        root = _safe_root(self.exported, self.recipe.name)
        source_dir = resolve_model_source(self.recipe.model.source, self.recipe.model.revision)
        self.data = DataBundle.from_recipe(self.recipe)
        self.task = get_task(self.recipe.model.task)
        self.notes = preflight(self.recipe, source_dir, self.data, self.task)  # nothing written before
        plan = build_plan(self.recipe, self.exported, source_dir)
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root / ".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise StageError(
                f"{root}: another run of recipe {self.recipe.name!r} holds {root / '.lock'}; "
                "wait for it to finish"
            ) from None
        self._lock = lock
        try:
            _remove_leftovers(root)
            self.machine = machine_fingerprint()
            self.source_digest = mf.digest_of(mf.hash_folder(source_dir))
            self.selected = self._selected(plan)
        except BaseException:
            self.release_lock()
            raise
        self.ran: list[str] = []
        self.cached: list[str] = []
        self.failed: dict[str, str] = {}  # variant or candidate -> why it has no artifact
        return plan

    def release_lock(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()
            self._lock = None

    def __getstate__(self) -> dict[str, Any]:
        # An executor ships the runner to its workers; the lock stays with the process holding it.
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def label(self, plan: Plan, node: Node) -> str:
        """How the log and the errors name a node: its place in the run and its folder."""
        index = self.selected.index(node) + 1
        return f"[{index}/{len(self.selected)}] {node.folder.relative_to(plan.root)}"

    def run_nodes(self, plan: Plan) -> StageError | None:
        """Every selected node in plan order; returns the first stage failure (the others ran)."""
        search_budget = self.recipe.search.max_seconds if self.recipe.search else None
        search_spent = 0.0
        first_error: StageError | None = None
        for node in self.selected:
            if self.blocked(node):
                node.status = "skipped"
                continue
            if plan.candidate_only(node) and search_budget is not None and search_spent > search_budget:
                self.skip_over_budget(node, search_budget)
                continue
            clock = time.perf_counter()
            try:
                self.execute_node(node, plan, self.label(plan, node))
            except OutputError:
                raise
            except StageError as err:
                # One variant's failure (a parity error, a failed quantizer) does not stop the
                # others: it is reported, the run's exit code says so (1).
                first_error = first_error or err
                self.record_failure(node, err)
                continue
            finally:
                if plan.candidate_only(node):
                    search_spent += time.perf_counter() - clock
            self.record_done(node, plan)
        return first_error

    @staticmethod
    def blocked(node: Node) -> bool:
        """Whether an upstream node of `node` failed or was skipped (then it is skipped too)."""
        return any(n.status in ("failed", "skipped") for n in node.chain()[:-1])

    def skip_over_budget(self, node: Node, budget: float) -> None:
        node.status = "skipped"
        for name in node.variants:
            self.failed.setdefault(name, f"not built: search.max_seconds {budget:g} spent")

    def record_failure(self, node: Node, err: StageError) -> None:
        node.status = "failed"
        log.error("%s", err)
        for name in node.variants:
            self.failed.setdefault(name, str(err))

    def record_done(self, node: Node, plan: Plan) -> None:
        (self.ran if node.status == "ran" else self.cached).append(str(node.folder.relative_to(plan.root)))

    def execute_node(self, node: Node, plan: Plan, label: str) -> None:
        """Run (or find cached) one node whose parent has its manifest."""
        if node.parent is None:
            input_dir, upstream = plan.source_dir, self.source_digest
        else:
            assert node.parent.manifest is not None, "parents run first"
            input_dir, upstream = node.parent.folder, mf.digest_of(node.parent.manifest["outputs"])
        self._run_node(
            node,
            plan,
            input_dir,
            upstream,
            label,
            reference_hf_dir=_reference_hf(node.chain(), plan.source_dir),
        )

    def conclude(self, plan: Plan, first_error: StageError | None) -> None:
        """After the nodes: fail with the first cause when no variant is left, else write the index."""
        if first_error is not None and plan.variants and all(n in self.failed for n in plan.variants):
            raise first_error  # nothing left to validate: the run fails with the first cause
        mf.write_json(plan.root / "variants.json", self._index(plan, self.selected))

    def wants_validation(self) -> bool:
        """Whether this run validates (and releases) after its nodes."""
        if self.until not in (None, "validate", "search"):
            return False
        if self.recipe.data.eval is None:
            # No labeled data, no accuracy: say so; `gate` then fails for lack of a report.
            log.info("no data.eval in the recipe: validation, report and release skipped")
            return False
        return True

    def result(self, plan: Plan) -> RunResult:
        return RunResult(plan=plan, ran=list(self.ran), cached=list(self.cached), failed=dict(self.failed))

    def _selected(self, plan: Plan) -> list[Node]:
        if self.until in (None, "validate", "search"):
            return plan.nodes
        # Every node up to and including the first `until` stage of each chain.
        keep: list[Node] = []
        for final in [*plan.variants.values(), *plan.candidates.values()]:
            chain = final.chain()
            stages = [n.stage for n in chain]
            if self.until not in stages:
                continue
            for node in chain[: stages.index(self.until) + 1]:
                if node not in keep:
                    keep.append(node)
        if not keep:
            raise RecipeError(
                f"--until {self.until}: no variant of recipe {self.recipe.name!r} has that stage"
            )
        return [n for n in plan.nodes if n in keep]

    def declared_reads(self, spec: StageSpec, config: Any) -> dict[str, Any]:
        """What a stage with `config` declares it reads besides its input: data digests, other
        sections, machine facts (each a part of its cache key and of its context)."""
        sections = {
            "export.parity": self.recipe.export.parity,
            "finetune": self.recipe.finetune,
            "gates": self.recipe.gates,
            "validate": self.recipe.validate_,
            "release": self.recipe.release,
        }
        return {
            "data": {split: self.data.digest(split) for split in spec.splits(config) if self.data.has(split)},
            "sections": {name: sections[name] for name in spec.reads(config)},
            "machine": spec.facts(config, self.machine),
        }

    def cache_key(self, stage: str, config: dict[str, Any], upstream: str, reads: dict[str, Any]) -> str:
        """sha256 over exactly what the stage reads (see the module docstring)."""
        payload = {
            "stage": stage,
            "config": config,
            "upstream": upstream,
            "data": reads["data"],
            "sections": {
                k: v.model_dump(mode="json") if v is not None else None for k, v in reads["sections"].items()
            },
            "machine": reads["machine"],
            "model": self.recipe.model.model_dump(mode="json", exclude={"source", "revision"}),
            "versions": mf.versions(),
        }
        return mf.sha256_text(canonical_json(payload))

    def _run_node(
        self,
        node: Node,
        plan: Plan,
        input_dir: Path,
        upstream: str,
        label: str,
        *,
        reference_hf_dir: Path | None = None,
        variants: dict[str, tuple[Path, list[dict[str, Any]]]] | None = None,
        force: bool = False,
    ) -> None:
        spec = get_stage(node.stage)
        config = spec.config_cls.model_validate(node.config)
        reads = self.declared_reads(spec, config)
        node.key = self.cache_key(node.stage, node.config, upstream, reads)

        previous = mf.read_manifest(node.folder)
        if (
            not (self.force or force)
            and previous
            and previous.get("cache_key") == node.key
            and mf.outputs_intact(node.folder, previous)
        ):
            node.status, node.manifest = "cached", previous
            log.info("%s cached (key %s), skipped", label, node.key[:12])
            return

        log.info("%s running %s ...", label, node.stage)
        tmp = node.folder.parent / f".tmp-{node.folder.name}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
        except OSError as err:
            raise OutputError(f"{label}: cannot create {tmp.parent}: {err.strerror or err}") from None
        started, clock = datetime.now(timezone.utc), time.perf_counter()
        context = StageContext(
            config=config,
            model=self.recipe.model,
            task=self.task,
            input_dir=input_dir,
            output_dir=tmp,
            data=self.data.view(tuple(reads["data"])),
            machine=reads["machine"],
            sections=reads["sections"],
            log=log,
            reference_hf_dir=reference_hf_dir,
            variants=variants or {},
        )
        try:
            metrics = spec.fn(context) or {}
            outputs = mf.hash_folder(tmp)
            if not outputs:
                raise StageError(f"{node.stage}: the stage wrote no output")
            manifest = {
                "stage": node.stage,
                "variants": node.variants,
                "config": node.config,
                "cache_key": node.key,
                "inputs": {
                    "folder": _relative(input_dir, plan.root),
                    "digest": upstream,
                    "files": node.parent.manifest["outputs"]
                    if node.parent is not None and node.parent.manifest
                    else mf.hash_folder(input_dir),
                },
                "data": reads["data"],
                "reads": {
                    "sections": sorted(reads["sections"]),
                    "machine": reads["machine"] if node.stage != "validate" else "machine (fingerprint)",
                },
                "model": self.recipe.model.model_dump(mode="json"),
                "outputs": outputs,
                "metrics": metrics,
                "versions": mf.versions(),
                "machine": self.machine,
                "started_at": started.isoformat(timespec="seconds"),
                "duration_s": round(time.perf_counter() - clock, 3),
            }
            mf.write_json(tmp / mf.MANIFEST, manifest)
            _publish(tmp, node.folder)
        except PipelineError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except (KeyboardInterrupt, SystemExit):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except OSError as err:  # disk full, permissions: say which file, keep the old output
            shutil.rmtree(tmp, ignore_errors=True)
            where = f" {err.filename}" if err.filename else ""
            raise OutputError(f"{label}: {node.stage} could not write{where}: {err.strerror or err}") from err
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StageError(
                f"{label}: {node.stage} failed: {type(err).__name__}: {first_line(err)}"
            ) from err
        node.status, node.manifest = "ran", manifest
        log.info("%s done in %.1fs", label, manifest["duration_s"])

    def validate_and_release(self, plan: Plan) -> None:
        """Measure every variant against PyTorch (the validate stage, cached like any stage), then
        take the decisions, write the report and publish the release bundle.

        When only `gates` or `release` changed, the decisions are recomputed from the cached
        measurements; `--force` / `--revalidate` measures again. With no variant within the gates
        there is no release, and an old bundle is removed so that a stale one never lingers.
        """
        from pipeline.stages.validate import load_measurements

        root = plan.root
        built = {v: n for v, n in plan.variants.items() if n.manifest is not None and v not in self.failed}
        search = self._search(plan) if self.recipe.search is not None else None
        if self.until == "search":
            return
        if search is not None and search["winner"]:
            built[search["winner"]] = plan.candidates[search["winner"]]
        if not built:
            raise StageError(f"validate: no variant of recipe {self.recipe.name!r} was built: {self.failed}")
        variants = {v: (n.folder, [m.manifest for m in n.chain()]) for v, n in built.items()}
        node = self._fan_in_node("validate", self.recipe.validate_.model_dump(mode="json"), plan, built)
        if self.failed:
            self.notes = [*self.notes, *(f"{v}: not validated: {why}" for v, why in self.failed.items())]
        decision_key = mf.sha256_text(
            canonical_json(
                {
                    "gates": self.recipe.gates.model_dump(mode="json"),
                    "release": self.recipe.release.model_dump(mode="json"),
                    "notes": self.notes,
                }
            )
        )
        self._run_node(
            node,
            plan,
            plan.baseline_dir(),
            node.upstream,
            "validation measurements",
            variants=variants,
            force=self.revalidate,
        )
        previous = read_report(root)
        if (
            node.status == "cached"
            and previous.get("measurement_key") == node.key
            and previous.get("decision_key") == decision_key
            and (self.until == "validate" or release_intact(root, previous))
        ):
            log.info(
                "validate cached (key %s, measured %s), skipped; --revalidate measures again",
                node.key[:12],
                node.manifest.get("started_at"),
            )
            return
        if node.status == "cached":
            log.info("validate: measurements cached (key %s); gates or release changed", node.key[:12])
        measured_at = node.manifest.get("started_at") if node.manifest else None
        report = decide(
            self.recipe, load_measurements(node.folder), node.key, decision_key, measured_at, self.notes
        )
        if search is not None:
            report["search"] = search
        report["failed_variants"] = dict(self.failed)
        write_report_files(report, root)
        if self.until == "validate":
            return
        self._release(plan, report, variants)

    def _fan_in_node(self, stage: str, config: dict[str, Any], plan: Plan, chains: dict[str, Node]) -> Node:
        """A node reading the final artifacts of `chains` (and the baseline): validate, search."""
        baseline = plan.finetune_node()
        node = Node(stage, config, None, plan.root / stage)
        node.variants = list(chains)
        node.upstream = mf.sha256_text(
            canonical_json(
                {
                    "baseline": mf.digest_of(baseline.manifest["outputs"])
                    if baseline
                    else self.source_digest,
                    "variants": {v: mf.digest_of(n.manifest["outputs"]) for v, n in chains.items()},
                }
            )
        )
        return node

    def _search(self, plan: Plan) -> dict[str, Any]:
        """The search stage over the candidates that were built; its trail, with the others named."""
        from pipeline.stages.search import load_trail

        built = {v: n for v, n in plan.candidates.items() if n.manifest is not None and v not in self.failed}
        not_built = {v: self.failed.get(v, "not built") for v in plan.candidates if v not in built}
        for name in plan.candidates:
            self.failed.pop(name, None)  # candidates are reported in the search trail, not as variants
        if not built:
            return {
                "winner": None,
                "reason": "no candidate was built",
                "candidates": {},
                "not_built": not_built,
            }
        node = self._fan_in_node(
            "search", self.recipe.search.model_dump(mode="json", by_alias=True), plan, built
        )
        self._run_node(
            node,
            plan,
            plan.baseline_dir(),
            node.upstream,
            "search",
            variants={v: (n.folder, [m.manifest for m in n.chain()]) for v, n in built.items()},
            force=self.revalidate,
        )
        return {**load_trail(node.folder), "not_built": not_built}

    def _release(self, plan: Plan, report: dict[str, Any], variants: dict[str, Any]) -> None:
        from pipeline.release import build_release

        root = plan.root
        release_tmp = root / f".tmp-release-{uuid.uuid4().hex[:8]}"
        release_tmp.mkdir()
        try:
            manifest = build_release(
                report,
                {v: folder for v, (folder, _) in variants.items()},
                {v: manifests for v, (_, manifests) in variants.items()},
                release_tmp,
                model=self.recipe.model,
                task=self.task,
            )
        except Exception:
            shutil.rmtree(release_tmp, ignore_errors=True)
            raise
        if manifest is None:
            shutil.rmtree(release_tmp, ignore_errors=True)
            shutil.rmtree(root / "release", ignore_errors=True)
            log.info("no release: %s", report.get("release", {}).get("reason"))
        else:
            _publish(release_tmp, root / "release")
            log.info("released variant %s -> %s", manifest.get("variant"), root / "release")

    def _index(self, plan: Plan, selected: list[Node]) -> dict[str, Any]:
        index: dict[str, Any] = {"recipe": self.recipe.name, "variants": {}}
        for name, final in plan.variants.items():
            chain = [n for n in final.chain() if n in selected]
            if not chain:
                continue
            index["variants"][name] = {
                "stages": [str(n.folder.relative_to(plan.root)) for n in chain],
                "artifact": str(chain[-1].folder.relative_to(plan.root)),
                "complete": chain[-1] is final,
            }
        return index


def _reference_hf(chain: list[Node], source_dir: Path) -> Path:
    """The checkpoint before any variant-specific step: the fine-tuned model, else the source."""
    finetuned = [n.folder for n in chain[:-1] if n.stage == "finetune"]
    return finetuned[-1] if finetuned else source_dir


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _safe_root(exported: Path, name: str) -> Path:
    """exported/<name>, refusing anything that would resolve outside exported/ (e.g. a symlink)."""
    base = exported.resolve()
    root = exported / name
    if root.is_symlink() or not (base / name).resolve().is_relative_to(base):
        raise RecipeError(f"{root}: output folder escapes {exported}/ (symlink or path trick)")
    return root


def _publish(tmp: Path, target: Path) -> None:
    """Replace `target` with the finished `tmp`: at any instant either the old or the new output
    exists complete, or (between two renames) none; never a half-written one."""
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Delete temp and replaced folders that a killed run left behind (we hold the lock)."""
    for leftover in list(root.glob("*/.tmp-*")) + list(root.glob("*/.old-*")) + list(root.glob(".tmp-*")):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in list(root.glob(".old-*")):
        shutil.rmtree(leftover, ignore_errors=True)
