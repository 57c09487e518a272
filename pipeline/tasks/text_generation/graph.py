"""Graph rewrites that make optimum's decoder exports quantizable, and small graph queries.

- `gemm_to_matmul`: optimum's GPT-2 export writes every Conv1D layer as Gemm(x, W, b). ONNX Runtime's
  dynamic INT8 quantizer has no Gemm in its integer-op registry and MatMulNBits (INT4) only takes
  MatMul/Gather, so left as Gemm those layers would silently stay fp32. Gemm(x, W, b) with
  alpha = beta = 1 and a constant W becomes MatMul(x, W) + b: the same arithmetic.
- `untie_lm_head`: a tied LM head is exported as MatMul(h, Transpose(embedding)); quantizers only
  quantize a MatMul whose weight is an initializer. Materialising the transposed embedding as its own
  initializer lets the LM head be quantized deliberately (it costs one extra vocab x hidden weight
  in the file; ONNX Runtime already materialises it in memory by constant folding).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline.onnx.rewrite import set_graph_nodes

LM_HEAD_OUTPUT = "logits"


def initializers(model: Any) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def op_counts(model: Any) -> dict[str, int]:
    return dict(Counter(node.op_type for node in model.graph.node))


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def gemm_to_matmul(model: Any) -> int:
    """Rewrite Gemm(x, W[, b]) with a constant 2-D W as MatMul (+ Add) in place; returns the count."""
    import onnx
    from onnx import numpy_helper

    inits = initializers(model)
    consumers = Counter(name for node in model.graph.node for name in node.input)
    new_nodes, rewritten = [], 0
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) >= 2 else None
        if (
            weight is None
            or len(weight.dims) != 2
            or _attr(node, "alpha", 1.0) != 1.0
            or _attr(node, "beta", 1.0) != 1.0
            or _attr(node, "transA", 0) != 0
        ):
            new_nodes.append(node)
            continue
        weight_name = node.input[1]
        if _attr(node, "transB", 0):
            if consumers[weight_name] != 1:
                new_nodes.append(node)  # shared weight: transposing it would change the others
                continue
            array = numpy_helper.to_array(weight).T.copy()
            weight.CopyFrom(numpy_helper.from_array(array, weight_name))
        base = node.name or node.output[0]
        has_bias = len(node.input) >= 3 and node.input[2]
        product = f"{base}/MatMul_output_0" if has_bias else node.output[0]
        new_nodes.append(
            onnx.helper.make_node("MatMul", [node.input[0], weight_name], [product], name=f"{base}/MatMul")
        )
        if has_bias:
            new_nodes.append(
                onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{base}/Add")
            )
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return rewritten


def lm_head_node(model: Any) -> Any | None:
    """The MatMul/Gemm that produces the logits (directly, or through a Reshape/Add)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get(LM_HEAD_OUTPUT)
    for _ in range(4):
        if node is None:
            return None
        if node.op_type in ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger"):
            return node
        node = producers.get(node.input[0])
    return None


def lm_head_is_tied(model: Any) -> bool:
    """Whether the LM head's weight is computed (e.g. Transpose of the embedding), not an initializer."""
    head = lm_head_node(model)
    if head is None or head.op_type != "MatMul":
        return False
    return head.input[1] not in initializers(model)


def untie_lm_head(model: Any, name: str = "lm_head.weight") -> bool:
    """Replace MatMul(h, Transpose(E)) at the LM head by MatMul(h, E^T as an initializer) in place."""
    from onnx import numpy_helper

    head = lm_head_node(model)
    if head is None or head.op_type != "MatMul":
        return False
    inits = initializers(model)
    weight_input = head.input[1]
    if weight_input in inits:
        return False
    producer = next((n for n in model.graph.node if weight_input in n.output), None)
    if producer is None or producer.op_type != "Transpose" or producer.input[0] not in inits:
        return False
    perm = _attr(producer, "perm", None)
    array = numpy_helper.to_array(inits[producer.input[0]])
    array = array.transpose(perm) if perm else array.T
    model.graph.initializer.append(numpy_helper.from_array(array.copy(), name))
    head.input[1] = name
    if not any(weight_input in n.input for n in model.graph.node):
        model.graph.node.remove(producer)
    return True


def embedding_node(model: Any) -> Any | None:
    """The token-embedding Gather: the largest 2-D initializer table that a Gather reads."""
    inits = initializers(model)
    candidates = [
        n
        for n in model.graph.node
        if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
    ]
    # The vocabulary is the largest table (GPT-2 also gathers position embeddings).
    return max(candidates, key=lambda n: inits[n.input[0]].dims[0], default=None)


def pack_sibling_matmuls(model: Any) -> int:
    """MatMuls that read the same input with constant fp32 weights of the same K (a layer's q/k/v
    projections, its gate/up projections) become one MatMul over the concatenated weights and a
    Split: the same arithmetic in one kernel call instead of two or three, which is what a decode
    step of a small model pays for (SmolLM2-135M: 210 projection MatMuls become 120). The LM head
    is left alone. Returns how many packed MatMuls were made."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = initializers(model)
    groups: dict[str, list[Any]] = {}
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if (
            weight is not None
            and len(weight.dims) == 2
            and weight.data_type == TensorProto.FLOAT
            and node.output[0] != LM_HEAD_OUTPUT
        ):
            groups.setdefault(node.input[0], []).append(node)
    replacement: dict[int, list[Any]] = {}
    for source, members in groups.items():
        weights = [numpy_helper.to_array(inits[m.input[1]]) for m in members]
        if len(members) < 2 or len({w.shape[0] for w in weights}) != 1:
            continue
        # ".../self_attn/q_proj/MatMul" + k + v -> ".../self_attn/packed_q_proj_k_proj_v_proj"
        parts = [m.name.rsplit("/", 2) for m in members]
        scopes = {p[0] for p in parts if len(p) == 3}
        if len(scopes) == 1 and all(len(p) == 3 for p in parts):
            name = f"{scopes.pop()}/packed_{'_'.join(p[1] for p in parts)}"
        else:
            name = f"{source}/packed"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.concatenate(weights, axis=1), f"{name}.weight"),
                numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), f"{name}.split"),
            ]
        )
        replacement[id(members[0])] = [
            helper.make_node(
                "MatMul", [source, f"{name}.weight"], [f"{name}/MatMul_output_0"], name=f"{name}/MatMul"
            ),
            helper.make_node(
                "Split",
                [f"{name}/MatMul_output_0", f"{name}.split"],
                [m.output[0] for m in members],
                name=f"{name}/Split",
                axis=-1,
            ),
        ]
        for member in members[1:]:
            replacement[id(member)] = []
    if not replacement:
        return 0
    set_graph_nodes(model, [new for node in graph.node for new in replacement.get(id(node), [node])])
    return sum(1 for group in replacement.values() if group)
