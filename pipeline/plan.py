"""The plan of a recipe: every variant's chain of stage nodes, identical prefixes shared.

Each variant is a chain: source model -> [finetune] -> [prune...] -> export -> [optimize/quantize...].
Variants that share a prefix share its nodes; each node runs once. A node's output folder is
`exported/<recipe>/<variant>/<stage>/`, owned by the first variant (in recipe order) that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import manifest as mf
from pipeline.config import Recipe, canonical_json


@dataclass(eq=False)
class Node:
    """One stage run in the DAG."""

    stage: str
    config: dict[str, Any]
    parent: Node | None
    folder: Path
    variants: list[str] = field(default_factory=list)
    key: str = ""
    status: str = "pending"  # pending | cached | ran | failed | skipped
    upstream: str = ""  # fan-in nodes (validate, search): digest of what they read
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
    """The DAG of a recipe: its nodes in run order and the last node of each variant (and of each
    search candidate: chains like variants, but only the search's winner is validated)."""

    recipe: Recipe
    root: Path  # exported/<recipe>
    source_dir: Path
    nodes: list[Node]
    variants: dict[str, Node]
    candidates: dict[str, Node] = field(default_factory=dict)

    def candidate_only(self, node: Node) -> bool:
        """Whether only search candidates use `node` (what the search's time budget can skip)."""
        return bool(self.candidates) and all(name in self.candidates for name in node.variants)

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
    candidates = recipe.search_candidates()
    for variant, steps in {**recipe.variants, **candidates}.items():
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
    return Plan(
        recipe=recipe,
        root=root,
        source_dir=source_dir,
        nodes=ordered,
        variants={name: node for name, node in finals.items() if name not in candidates},
        candidates={name: node for name, node in finals.items() if name in candidates},
    )
