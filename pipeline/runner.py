"""The runner: turns a recipe into a DAG of stage runs, caches them by content, publishes atomically.

Each variant is a chain: source model -> [finetune] -> [prune...] -> export -> [optimize/quantize...].
Variants that share a prefix share its nodes; each node runs once. A node's output folder is
`exported/<recipe>/<variant>/<stage>/`, owned by the first variant (in recipe order) that uses it.

Cache key = sha256(stage, config as applied, the upstream output's content digest, the data digests
the stage reads, the recipe's model section, package versions). A node whose manifest carries the
same key and whose files still match their recorded hashes is skipped.

Writes are atomic: a stage writes into `.tmp-*` beside its target; only a finished stage is renamed
into place, with its manifest. A lock file keeps two runs of one recipe from writing at once.
"""

from __future__ import annotations

import json
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
from pipeline.errors import PipelineError, RecipeError, StageError
from pipeline.recipe import Recipe, canonical_json
from pipeline.registry import StageContext, get_stage

log = logging.getLogger("pipeline")
SOURCE = "source"


@dataclass(eq=False)
class Node:
    """One stage run in the DAG."""

    stage: str
    config: dict[str, Any]
    parent: Node | None
    folder: Path
    variants: list[str] = field(default_factory=list)
    key: str = ""
    status: str = "pending"  # pending | cached | ran | skipped
    manifest: dict[str, Any] | None = None

    @property
    def identity(self) -> str:
        parent = self.parent.identity if self.parent else ""
        return mf.sha256_text(parent + "|" + self.stage + "|" + canonical_json(self.config))

    def chain(self) -> list[Node]:
        nodes, node = [], self
        while node is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    def export_node(self) -> Node:
        """The export stage this node's chain runs through (every variant chain has one)."""
        return next(n for n in self.chain() if n.stage == "export")


@dataclass
class Plan:
    """The DAG of a recipe: its nodes in run order and the last node of each variant."""

    recipe: Recipe
    root: Path  # exported/<recipe>
    source_dir: Path
    nodes: list[Node]
    variants: dict[str, Node]

    def finetune_node(self) -> Node | None:
        """The shared fine-tune stage, when the recipe fine-tunes."""
        return next((n for n in self.nodes if n.stage == "finetune"), None)

    def baseline_dir(self) -> Path:
        """The PyTorch checkpoint every variant is measured against: fine-tuned, else the source."""
        node = self.finetune_node()
        return node.folder if node else self.source_dir

    def plain_export_node(self) -> Node | None:
        """The export of the un-pruned model (None when every variant prunes)."""
        return next(
            (n for n in self.nodes if n.stage == "export" and all(p.stage != "prune" for p in n.chain())),
            None,
        )


def build_plan(recipe: Recipe, exported: Path, source_dir: Path) -> Plan:
    """Lay out every variant's chain, sharing identical prefixes."""
    root = exported / recipe.name
    by_identity: dict[str, Node] = {}
    ordered: list[Node] = []
    finals: dict[str, Node] = {}
    for variant, steps in recipe.variants.items():
        chain: list[tuple[str, dict[str, Any]]] = []
        if recipe.finetune is not None:
            chain.append(("finetune", recipe.finetune.model_dump(mode="json")))
        torch_steps = [s for s in steps if s.stage == "prune"]
        onnx_steps = [s for s in steps if s.stage != "prune"]
        chain += [(s.stage, s.config) for s in torch_steps]
        chain.append(("export", recipe.export.model_dump(mode="json")))
        chain += [(s.stage, s.config) for s in onnx_steps]
        parent: Node | None = None
        used: dict[str, int] = {}
        for stage_name, config in chain:
            used[stage_name] = used.get(stage_name, 0) + 1
            suffix = "" if used[stage_name] == 1 else f"-{used[stage_name]}"
            node = Node(stage_name, config, parent, root / variant / f"{stage_name}{suffix}")
            existing = by_identity.get(node.identity)
            if existing is None:
                by_identity[node.identity] = node
                ordered.append(node)
            else:
                node = existing
            node.variants.append(variant)
            parent = node
        assert parent is not None
        finals[variant] = parent
    return Plan(recipe=recipe, root=root, source_dir=source_dir, nodes=ordered, variants=finals)


@dataclass
class RunResult:
    plan: Plan
    ran: list[str]
    cached: list[str]


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
        from pipeline.data import DataBundle
        from pipeline.fingerprint import machine_fingerprint
        from pipeline.sources import resolve_model_source

        root = _safe_root(self.exported, self.recipe.name)
        source_dir = resolve_model_source(self.recipe.model.source, self.recipe.model.revision)
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
        try:
            _remove_leftovers(root)
            data = DataBundle(self.recipe)
            machine = machine_fingerprint()
            source_digest = mf.digest_of(mf.hash_folder(source_dir))
            selected = self._selected(plan)
            ran, cached = [], []
            for index, node in enumerate(selected, 1):
                label = f"[{index}/{len(selected)}] {node.folder.relative_to(plan.root)}"
                self._run_node(node, plan, data, machine, source_digest, label)
                (ran if node.status == "ran" else cached).append(str(node.folder.relative_to(plan.root)))
            mf.write_json(root / "variants.json", self._index(plan, selected))
            if self.until is None and self.recipe.data.eval is None:
                # No labeled data, no accuracy: say so; `gate` then fails for lack of a report.
                log.info("no data.eval in the recipe: validation, report and release skipped")
            elif self.until is None:
                self._validate_and_release(plan, data, machine)
            return RunResult(plan=plan, ran=ran, cached=cached)
        finally:
            lock.release()

    def _selected(self, plan: Plan) -> list[Node]:
        if self.until is None:
            return plan.nodes
        # Every node up to and including the first `until` stage of each chain.
        keep: list[Node] = []
        for final in plan.variants.values():
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

    def _cache_key(self, node: Node, upstream_digest: str, data_digests: dict[str, str]) -> str:
        payload = {
            "stage": node.stage,
            "config": node.config,
            "upstream": upstream_digest,
            "data": data_digests,
            "model": self.recipe.model.model_dump(mode="json", exclude={"source", "revision"}),
            "export_parity": self.recipe.export.parity.model_dump(mode="json"),
            "versions": mf.versions(),
        }
        return mf.sha256_text(canonical_json(payload))

    def _run_node(
        self, node: Node, plan: Plan, data: Any, machine: dict[str, Any], source_digest: str, label: str
    ) -> None:
        spec = get_stage(node.stage)
        if node.parent is None:
            input_dir, upstream_digest = plan.source_dir, source_digest
        else:
            assert node.parent.manifest is not None, "parents run first"
            input_dir = node.parent.folder
            upstream_digest = mf.digest_of(node.parent.manifest["outputs"])
        config = spec.config_cls.model_validate(node.config)
        data_digests = {
            split: data.digest(split) for split in spec.splits(config) if _split_used(self.recipe, split)
        }
        node.key = self._cache_key(node, upstream_digest, data_digests)

        previous = mf.read_manifest(node.folder)
        if (
            not self.force
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
            raise StageError(f"{label}: cannot create {tmp.parent}: {err.strerror or err}") from None
        started, clock = datetime.now(timezone.utc), time.perf_counter()
        chain = node.chain()
        context = StageContext(
            config=config,
            recipe=self.recipe,
            input_dir=input_dir,
            output_dir=tmp,
            data=data,
            machine=machine,
            log=log,
            reference_hf_dir=_reference_hf(chain, plan.source_dir),
            reference_onnx_dir=next((n.folder for n in reversed(chain[:-1]) if n.stage == "export"), None),
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
                    "digest": upstream_digest,
                    "files": mf.hash_folder(input_dir)
                    if node.parent is None
                    else node.parent.manifest["outputs"],
                },
                "data": data_digests,
                "model": self.recipe.model.model_dump(mode="json"),
                "outputs": outputs,
                "metrics": metrics,
                "versions": mf.versions(),
                "machine": machine,
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
            raise StageError(f"{label}: {node.stage} could not write{where}: {err.strerror or err}") from err
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise StageError(f"{label}: {node.stage} failed: {type(err).__name__}: {first}") from err
        node.status, node.manifest = "ran", manifest
        log.info("%s done in %.1fs", label, manifest["duration_s"])

    def _validate_and_release(self, plan: Plan, data: Any, machine: dict[str, Any]) -> None:
        """Measure every variant against PyTorch, write the report, publish the release bundle.

        Measurements are cached like a stage: their key covers every variant's output digest, the
        baseline, the eval data, the validate and model settings, the machine fingerprint and the
        package versions, so a rerun with nothing changed on the same machine reuses them (and
        `--force` / `--revalidate` measures again). When only `gates` or `release` changed, the
        decisions are recomputed from the cached measurements. Outputs are published atomically;
        with no variant within the gates there is no release, and an old bundle is removed so that
        a stale one never lingers.
        """
        from pipeline.release import build_release
        from pipeline.stages.validate import finalize_report, validate_variants

        root = plan.root
        variant_dirs = {v: n.folder for v, n in plan.variants.items()}
        manifests = {v: [n.manifest for n in final.chain()] for v, final in plan.variants.items()}
        baseline_node = plan.finetune_node()
        baseline = plan.baseline_dir()
        measure_key = mf.sha256_text(
            canonical_json(
                {
                    "validate": self.recipe.validate_.model_dump(mode="json"),
                    "model": self.recipe.model.model_dump(mode="json", exclude={"source", "revision"}),
                    "variants": {v: mf.digest_of(n.manifest["outputs"]) for v, n in plan.variants.items()},
                    "baseline": mf.digest_of(
                        baseline_node.manifest["outputs"] if baseline_node else mf.hash_folder(baseline)
                    ),
                    "eval": data.digest("eval"),
                    "machine": machine,
                    "versions": mf.versions(),
                }
            )
        )
        decision_key = mf.sha256_text(
            canonical_json(
                {
                    "gates": self.recipe.gates.model_dump(mode="json"),
                    "release": self.recipe.release.model_dump(mode="json"),
                }
            )
        )
        previous = mf.read_manifest(root / "validate")
        measured = (
            not (self.force or self.revalidate)
            and previous is not None
            and previous.get("cache_key") == measure_key
            and mf.outputs_intact(root / "validate", previous)
        )
        if measured and previous.get("decision_key") == decision_key and _release_intact(root, previous):
            log.info(
                "validate cached (key %s, measured %s), skipped; --revalidate measures again",
                measure_key[:12],
                previous.get("measured_at"),
            )
            return
        tmp = root / f".tmp-validate-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            if measured:
                log.info("validate: measurements cached (key %s); gates or release changed", measure_key[:12])
                report = json.loads((root / "validate" / "report.json").read_text(encoding="utf-8"))
                report = finalize_report(self.recipe, report, tmp, log)
                measured_at = previous.get("measured_at")
            else:
                log.info("validating %d variant(s) against PyTorch ...", len(variant_dirs))
                measured_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
                report = validate_variants(
                    self.recipe, variant_dirs, baseline, data, machine, tmp, manifests, log
                )
            mf.write_json(
                tmp / mf.MANIFEST,
                {
                    "stage": "validate",
                    "cache_key": measure_key,
                    "decision_key": decision_key,
                    "measured_at": measured_at,
                    "release": report.get("release", {}).get("variant"),
                    "outputs": mf.hash_folder(tmp),
                },
            )
        except PipelineError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StageError(f"validate failed: {type(err).__name__}: {err}") from err
        _publish(tmp, root / "validate")
        for name in ("report.json", "report.md", "report.html", "report.png"):
            if (root / "validate" / name).exists():
                staged = root / f".{name}.tmp"
                shutil.copy2(root / "validate" / name, staged)
                os.replace(staged, root / name)
        release_tmp = root / f".tmp-release-{uuid.uuid4().hex[:8]}"
        release_tmp.mkdir()
        try:
            manifest = build_release(self.recipe, report, variant_dirs, manifests, release_tmp)
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


def _release_intact(root: Path, validate_manifest: dict[str, Any]) -> bool:
    """The published release matches the cached report's pick and passes `verify` (or, when the
    report picked nothing, no bundle is there)."""
    from pipeline.release import verify_release

    expected = validate_manifest.get("release")
    folder = root / "release"
    if expected is None:
        return not folder.exists()
    try:
        variant = json.loads((folder / mf.MANIFEST).read_text(encoding="utf-8")).get("variant")
    except (OSError, ValueError):
        return False
    return variant == expected and not verify_release(folder)


def _split_used(recipe: Recipe, split: str) -> bool:
    if split == "calibration":
        return getattr(recipe.data, recipe.data.calibration.from_split) is not None
    return getattr(recipe.data, split) is not None


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
