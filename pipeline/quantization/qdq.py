"""A static QDQ INT8 graph rewritten into the form ONNX Runtime's CPU kernels run fastest.

ONNX Runtime's quantizer writes QuantizeLinear -> DequantizeLinear (Q -> DQ) around every quantized
tensor and points *every* consumer at the DQ output. At load time ORT turns DQ -> MatMul <- DQ(weight)
into MatMulIntegerToFloat, but it leaves three costs that dynamic INT8 does not pay (ORT profiler on
the default recipe's model at batch 8: 55.2 ms of kernel time against dynamic's 49.4):

- the bias Add after each MatMul stays a separate node (45 Adds, 4.5 ms; dynamic's
  DynamicQuantizeMatMul takes the bias inside);
- float consumers of a quantized tensor (the residual input of SkipLayerNormalization, Gelu, ...)
  read DQ(Q(x)) instead of x: 27 DequantizeLinear nodes (3.1 ms) that only add rounding error;
- a tensor read by several MatMuls (q/k/v) can carry one identical Q/DQ pair per reader.

`fold_qdq` writes the graph ORT would want: each weight MatMul (and its bias Add) becomes one
com.microsoft.MatMulIntegerToFloat over the quantized activation and weight, float consumers read
the float tensor, and identical Q/DQ nodes are merged. The MatMuls compute what they did before (same
int8 inputs, scales and zero points); the float consumers get the unrounded tensor. Left alone:
DQ -> Gather -> Q (ORT runs it as an int8 Gather; reading the float Gather would dequantize the
whole embedding table at every call) and activation-by-activation MatMuls (ORT makes them
QLinearMatMul when their output is quantized).
"""

from __future__ import annotations

from typing import Any

from pipeline.onnx.rewrite import live_nodes, set_graph_nodes

# Consumers that read a quantized tensor through its DQ on purpose: ORT fuses DQ into them.
_QUANTIZED_READERS = {"MatMul", "Gather", "QuantizeLinear", "DequantizeLinear", "MatMulIntegerToFloat"}


def fold_qdq(model: Any) -> dict[str, int]:
    """Rewrite the QDQ ModelProto `model` in place; returns what was changed (counts)."""
    from onnx import helper

    graph = model.graph
    outputs = {o.name for o in graph.output}
    inits = {i.name: i for i in graph.initializer}
    merged = _merge_identical(graph, "QuantizeLinear") + _merge_identical(graph, "DequantizeLinear")

    # Float consumers of DQ(Q(x)) read x itself. First, so that a MatMul whose output ORT quantized
    # (quantize_matmul_outputs) has its bias Add as sole reader once the dead Q/DQ pair goes.
    nodes = list(graph.node)
    producer = {out: node for node in nodes for out in node.output}
    float_of: dict[str, str] = {}
    for node in nodes:
        quantize = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if (
            quantize is not None
            and quantize.op_type == "QuantizeLinear"
            and list(quantize.input[1:]) == list(node.input[1:])
            and node.output[0] not in outputs
            and getattr(producer.get(quantize.input[0]), "op_type", None) != "Gather"
        ):
            float_of[node.output[0]] = quantize.input[0]
    rewired = 0
    for node in nodes:
        if node.op_type in _QUANTIZED_READERS:
            continue
        for index, name in enumerate(node.input):
            if name in float_of:
                node.input[index] = float_of[name]
                rewired += 1

    nodes = live_nodes(nodes, outputs)

    producer = {out: node for node in nodes for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    replaced: dict[int, Any] = {}
    removed: set[int] = set()
    biases = 0
    for node in nodes:
        if node.op_type != "MatMul":
            continue
        activation, weight = producer.get(node.input[0]), producer.get(node.input[1])
        if not (_per_tensor_dq(activation, inits) and _weight_dq(weight, inits)):
            continue
        columns = inits[weight.input[0]].dims[1]
        result, bias = node.output[0], ""
        readers = consumers.get(result, [])
        if result not in outputs and len(readers) == 1 and readers[0].op_type == "Add":
            add = readers[0]
            other = _initializer_behind(add.input[1] if add.input[0] == result else add.input[0], producer)
            if other in inits and tuple(inits[other].dims) == (columns,):
                bias, result = other, add.output[0]
                removed.add(id(add))
                biases += 1
        replaced[id(node)] = helper.make_node(
            "MatMulIntegerToFloat",
            [
                activation.input[0],
                weight.input[0],
                activation.input[1],
                weight.input[1],
                _input(activation, 2),
                _input(weight, 2),
                bias,
            ],
            [result],
            name=f"{node.name}_MatMulIntegerToFloat",
            domain="com.microsoft",
        )
    nodes = [replaced.get(id(n), n) for n in nodes if id(n) not in removed]

    set_graph_nodes(model, nodes)
    return {
        "matmuls_to_integer_ops": len(replaced),
        "biases_folded": biases,
        "float_readers_rewired": rewired,
        "duplicate_qdq_merged": merged,
    }


def _initializer_behind(name: str, producer: dict[str, Any]) -> str:
    """`name`, or the initializer an Identity chain passes on (torch's exporter writes a bias
    shared by two modules as Identity(initializer))."""
    while name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    return name


def _input(node: Any, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _per_tensor_dq(node: Any, inits: dict[str, Any]) -> bool:
    """A DequantizeLinear with one scale (MatMulIntegerToFloat's A side allows no other)."""
    if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in inits:
        return False
    return _size(inits[node.input[1]]) == 1 and "block_size" not in _attributes(node)


def _weight_dq(node: Any, inits: dict[str, Any]) -> bool:
    """A DequantizeLinear of a constant 2-D int8 weight, per tensor or per output column."""
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in inits:
        return False
    weight, attributes = inits[node.input[0]], _attributes(node)
    if len(weight.dims) != 2 or node.input[1] not in inits or "block_size" in attributes:
        return False
    scales = _size(inits[node.input[1]])
    return scales == 1 or (scales == weight.dims[1] and attributes.get("axis", 1) in (1, -1))


def _size(tensor: Any) -> int:
    size = 1
    for dim in tensor.dims:
        size *= dim
    return size


def _merge_identical(graph: Any, op_type: str) -> int:
    """Nodes of `op_type` with the same inputs and attributes become one; returns how many went."""
    first: dict[tuple[Any, ...], str] = {}
    alias: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == op_type:
            key = (*node.input, *(a.SerializeToString() for a in node.attribute))
            if key in first:
                alias[node.output[0]] = first[key]
            else:
                first[key] = node.output[0]
    outputs = {o.name for o in graph.output}
    alias = {name: kept for name, kept in alias.items() if name not in outputs}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in alias:
                node.input[index] = alias[name]
    return len(alias)
