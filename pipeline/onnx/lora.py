"""Swappable LoRA adapters for an exported ONNX model, run by ONNX Runtime's own adapter API.

`add_lora_inputs()` rewrites chosen `y = x @ W` MatMuls of a plain export into
`y = x @ W + (x @ A) @ B`, where A [in, rank] and B [rank, out] are graph inputs whose defaults are
rank-0 initializers: with no adapter active the added branch is an empty product (exactly zero), so
the model is the base model. An adapter is then a file (`.onnx_adapter`, written by
`write_adapter()`) of A and B tensors for those names; ONNX Runtime feeds them per call through
`RunOptions.add_active_adapter`, so one session serves every adapter and switching costs no reload.
The scale alpha / r is folded into B, so the graph carries no per-adapter constant.

Node names follow the TorchScript exporter that optimum drives: module `model.layers.0.self_attn.q_proj`
is node `/model/layers.0/self_attn/q_proj/MatMul`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError

RANK_DIM = "lora_rank"


@dataclass(frozen=True)
class LoraSlot:
    """One adapted MatMul: the module it came from and the graph inputs that carry A and B."""

    module: str
    node: str
    a_input: str
    b_input: str
    in_features: int
    out_features: int


def node_name(module: str) -> str:
    """The exporter's MatMul node name of a Linear module ('a.layers.0.b' -> '/a/layers.0/b/MatMul')."""
    parts: list[str] = []
    for part in module.split("."):
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return "/" + "/".join(parts) + "/MatMul"


def add_lora_inputs(model: Any, modules: list[str]) -> list[LoraSlot]:
    """Give each module's MatMul an overridable low-rank branch (in place); the slots added.

    InputError names the first module whose MatMul is missing or has no constant weight.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    by_name = {node.name: (i, node) for i, node in enumerate(graph.node)}
    slots: list[LoraSlot] = []
    inserts: list[tuple[int, list[Any]]] = []
    for module in modules:
        name = node_name(module)
        if name not in by_name or by_name[name][1].op_type != "MatMul":
            raise InputError(f"lora: module {module}: no MatMul node {name} in the exported graph")
        index, node = by_name[name]
        weight = weights.get(node.input[1])
        if weight is None or len(weight.dims) != 2:
            raise InputError(f"lora: module {module}: MatMul {name} has no 2-D constant weight")
        fan_in, fan_out = int(weight.dims[0]), int(weight.dims[1])
        a_name, b_name = f"{module}.lora_A", f"{module}.lora_B"
        base_out, branch_a, branch_b = f"{name}/base", f"{name}/lora_a", f"{name}/lora_b"
        graph.input.extend(
            [
                helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [fan_in, RANK_DIM]),
                helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [RANK_DIM, fan_out]),
            ]
        )
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.zeros((fan_in, 0), np.float32), a_name),
                numpy_helper.from_array(np.zeros((0, fan_out), np.float32), b_name),
            ]
        )
        output = node.output[0]
        node.output[0] = base_out
        inserts.append(
            (
                index,
                [
                    helper.make_node("MatMul", [node.input[0], a_name], [branch_a], name=f"{name}/LoraA"),
                    helper.make_node("MatMul", [branch_a, b_name], [branch_b], name=f"{name}/LoraB"),
                    helper.make_node("Add", [base_out, branch_b], [output], name=f"{name}/LoraAdd"),
                ],
            )
        )
        slots.append(LoraSlot(module, name, a_name, b_name, fan_in, fan_out))
    for index, nodes in sorted(inserts, key=lambda item: item[0], reverse=True):
        for offset, new in enumerate(nodes):
            graph.node.insert(index + 1 + offset, new)
    return slots


def adapter_tensors(
    peft_state: Mapping[str, Any], slots: list[LoraSlot], scale: float
) -> dict[str, np.ndarray]:
    """A and scale * B of every slot, as the graph's inputs want them ([in, r] and [r, out]), from a
    peft state dict (`...<module>.lora_A.<adapter>.weight` [r, in], `lora_B` [out, r])."""
    tensors: dict[str, np.ndarray] = {}
    for slot in slots:
        a = _find(peft_state, slot.module, "lora_A")
        b = _find(peft_state, slot.module, "lora_B")
        if a.shape[1] != slot.in_features or b.shape[0] != slot.out_features:
            raise InputError(
                f"lora: adapter for {slot.module} has shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                f"the model's layer is {slot.in_features} -> {slot.out_features}"
            )
        tensors[slot.a_input] = np.ascontiguousarray(a.T, dtype=np.float32)
        tensors[slot.b_input] = np.ascontiguousarray((scale * b).T, dtype=np.float32)
    return tensors


def _find(state: Mapping[str, Any], module: str, which: str) -> np.ndarray:
    suffix = f"{module}.{which}."
    for key, value in state.items():
        if f".{suffix}" in f".{key}" and key.endswith(".weight"):
            return value.detach().float().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    raise InputError(f"lora: the adapter has no {which} for module {module}")


def write_adapter(path: Path, tensors: Mapping[str, np.ndarray], version: int = 1) -> Path:
    """An ONNX Runtime adapter file (.onnx_adapter) holding `tensors`, written atomically."""
    import onnxruntime as ort

    path = Path(path)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(version)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in tensors.items()})
    partial = path.with_name(path.name + ".partial")
    fmt.export_adapter(str(partial))
    partial.replace(path)
    return path


class AdaptedSession:
    """An InferenceSession whose `run` calls go out with one adapter active (or none: the base).

    Adapters are loaded once (`load`); `activate` switches between loaded ones by swapping the
    RunOptions, with no session reload. Everything else is the wrapped session's (get_inputs, ...),
    so code written for a plain session runs unchanged.
    """

    def __init__(self, session: Any) -> None:
        import onnxruntime as ort

        self._session = session
        self._adapters: dict[str, Any] = {}
        self._options = ort.RunOptions()
        self.active: str | None = None

    def load(self, name: str, path: Path) -> None:
        """Read the adapter file at `path` into memory under `name`."""
        import onnxruntime as ort

        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        self._adapters[name] = adapter

    def activate(self, name: str | None) -> None:
        """Run with the loaded adapter `name` from now on (None: the base model)."""
        import onnxruntime as ort

        options = ort.RunOptions()
        if name is not None:
            if name not in self._adapters:
                raise InputError(f"lora: no adapter {name!r} is loaded (loaded: {sorted(self._adapters)})")
            options.add_active_adapter(self._adapters[name])
        self._options, self.active = options, name

    def run(self, output_names: Any, feeds: Any, run_options: Any = None) -> Any:
        return self._session.run(output_names, feeds, run_options or self._options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)
