"""GroupQueryAttention for Llama-style decoders: one contrib op per layer instead of ~100 nodes.

ONNX Runtime's transformer optimizer fuses RotaryEmbedding and SkipSimplifiedLayerNormalization in
optimum's Llama export, but no attention: each layer keeps the causal/padding mask arithmetic, the
repeat-kv Expand/Reshape of grouped KV heads, two Concats for the cache and the softmax chain: 5,087
nodes for SmolLM2's 30 layers after ORT's fusions (468 after this rewrite), most of them shape
arithmetic that runs at every decode step.
This rewrite replaces each layer's attention, from its q/k/v projections to its o_proj input, with
`com.microsoft.GroupQueryAttention`, keeping the graph's inputs and outputs (names, shapes, the
past/present cache layout) exactly as they were:

- q and k are rotated by RotaryEmbedding nodes on the [batch, seq, heads x head] projections, with
  the cos/sin caches and position ids of the RotaryEmbedding nodes ORT fused (so Hugging Face's
  position ids, 1 at left-padded slots, still decide the rotation); GQA itself does no rotary.
  Or, with `rotary_in_attention`, GQA rotates q and k itself (do_rotary, the fused caches) and
  takes the packed q/k/v projection whole (`feed_packed_qkv`): each layer's 2 RotaryEmbedding and
  its q/k/v Split go. GQA then rotates every token by its cache slot and ignores position_ids
  (ONNX Runtime 1.32 reads only position_ids[0, 0] on a first prompt, for every row, so Hugging
  Face's per-row positions cannot be fed). A left-padded row's slots are its position ids plus its
  pad count: attention sees only differences of positions, so logits stay Hugging Face's, but that
  row's cached keys are rotated by its pad count more than Hugging Face's. Such a model's cache is
  only valid for the model itself at the slots it was computed at; the optimize stage proves
  parity through `slot_rotation_reference`, which rotates the reference's past and present keys
  by each row's pad count. Masks that are not left padding (holes, packed sequences) would need
  the RotaryEmbedding form.
- Padding is an additive attention bias built once from `attention_mask` (0 where a key is real,
  the lowest float where it is padding); GQA applies the causal mask. `seqlens_k` is the total
  length minus one for every row and `total_sequence_length` the mask's length, so the cache holds
  every slot, padded or not, as the unfused graph does.

The result is proven equal to the unfused graph by the optimize stage's parity grid (prompts with
left-padded rows, decode steps after a past). Measured on SmolLM2-135M (one interleaved run,
decode at past 256): fp32 85 -> 74 ms, HQQ INT4 72 -> 48 ms; perplexity unchanged.

Applies when every layer matches: `/model/layers.{i}/self_attn/{q,k,v,o}_proj/MatMul` (the
TorchScript exporter's module-path names), q and k each reaching a fused RotaryEmbedding through
Reshape -> Transpose, and `present.{i}.key/value` made by Concat(past, new). Anything else is
reported as not applicable, with the reason.
"""

from __future__ import annotations

from typing import Any

from pipeline.onnx.rewrite import set_graph_nodes

GQA_MODEL_TYPES = ("llama", "mistral", "qwen2")


class NotApplicable(Exception):
    """The graph or the model is not one this rewrite handles; the message says why."""


class RotaryNotApplicable(NotApplicable):
    """GQA cannot rotate q and k itself here; the RotaryEmbedding form still applies."""


def group_query_attention(
    model: Any, config: dict[str, Any], *, rotary_in_attention: bool = False
) -> dict[str, Any]:
    """Rewrite `model` (an ORT-fused decoder ModelProto) in place; `config` is its config.json.
    `rotary_in_attention`: GQA rotates q and k itself (do_rotary) with the fused nodes' caches, by
    cache slot (see the module docstring).
    Returns {"GroupQueryAttention": layers rewritten, "nodes_before": n, "nodes_after": n}."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    _check_config(config)
    graph = model.graph
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    inputs = {i.name for i in graph.input}
    for name in ("input_ids", "attention_mask"):
        if name not in inputs:
            raise NotApplicable(f"the graph has no input {name}")
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_name = {node.name: node for node in graph.node}
    nodes_before = len(graph.node)

    def constant(name: str, value: Any) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def projection_output(layer: int, proj: str) -> str:
        node = by_name.get(f"/model/layers.{layer}/self_attn/{proj}/MatMul")
        if node is None:
            raise NotApplicable(f"layer {layer}: no node /model/layers.{layer}/self_attn/{proj}/MatMul")
        out = node.output[0]
        after = consumers.get(out, [])
        if len(after) == 1 and after[0].op_type == "Add":  # a projection bias (Qwen2)
            out = after[0].output[0]
        return out

    def rotary_of(layer: int, proj: str) -> tuple[str, Any]:
        """(the projection's output, the RotaryEmbedding ORT fused after its Reshape -> Transpose)."""
        projection = projection_output(layer, proj)
        for reshape in consumers.get(projection, []):
            for transpose in consumers.get(reshape.output[0], []) if reshape.op_type == "Reshape" else []:
                for rotary in (
                    consumers.get(transpose.output[0], []) if transpose.op_type == "Transpose" else []
                ):
                    if rotary.op_type == "RotaryEmbedding":
                        return projection, rotary
        raise NotApplicable(f"layer {layer}: {proj} does not reach a fused RotaryEmbedding")

    added: list[Any] = []
    rewired: list[tuple[Any, str]] = []  # (o_proj node, new input) applied once every layer matched
    caches: set[tuple[str, str]] = set()
    layers = 0
    while f"/model/layers.{layers}/self_attn/q_proj/MatMul" in by_name:
        layer, scope = layers, f"/model/layers.{layers}/self_attn/"
        o_proj = by_name.get(scope + "o_proj/MatMul")
        if o_proj is None:
            raise NotApplicable(f"layer {layer}: no node {scope}o_proj/MatMul")
        (query, rotary_q), (key, rotary_k) = rotary_of(layer, "q_proj"), rotary_of(layer, "k_proj")
        value = projection_output(layer, "v_proj")
        past, present = f"past_key_values.{layer}", f"present.{layer}"
        for kind in ("key", "value"):
            made_by = producer.get(f"{present}.{kind}")
            if made_by is None or made_by.op_type != "Concat" or made_by.input[0] != f"{past}.{kind}":
                raise NotApplicable(f"layer {layer}: {present}.{kind} is not Concat({past}.{kind}, new)")
        caches.update({tuple(rotary_q.input[2:4]), tuple(rotary_k.input[2:4])})

        if rotary_in_attention:
            rotary = _rotary_attributes(graph, rotary_q, rotary_k, layer)
            q_in, k_in, caches_in = query, key, [*rotary_q.input[2:4], ""]  # no position_ids
            extra = {"do_rotary": 1, "rotary_interleaved": rotary.get("interleaved", 0)}
        else:
            query_rotated = _rotated(query, rotary_q, heads, f"{scope}gqa/q_proj")
            key_rotated = _rotated(key, rotary_k, kv_heads, f"{scope}gqa/k_proj")
            added += [query_rotated, key_rotated]
            q_in, k_in, caches_in, extra = query_rotated.output[0], key_rotated.output[0], ["", "", ""], {}
        added.append(
            helper.make_node(
                "GroupQueryAttention",
                [
                    q_in,
                    k_in,
                    value,
                    f"{past}.key",
                    f"{past}.value",
                    "gqa/seqlens_k",
                    "gqa/total_sequence_length",
                    *caches_in,
                    "gqa/attention_bias",
                ],
                [scope + "gqa/output", f"{present}.key", f"{present}.value"],
                name=scope + "GroupQueryAttention",
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=kv_heads,
                **extra,
            )
        )
        rewired.append((o_proj, scope + "gqa/output"))
        layers += 1
    if not layers:
        raise NotApplicable("no /model/layers.{i}/self_attn/q_proj/MatMul nodes")

    # Every layer matched and nothing was changed so far. Computed once per call: seqlens_k,
    # total_sequence_length and the padding bias.
    one, two = constant("gqa/one", np.array([1], np.int64)), constant("gqa/two", np.array([2], np.int64))
    zero = constant("gqa/zero", np.array([0], np.int64))
    shared = [
        helper.make_node("Shape", ["attention_mask"], ["gqa/mask_shape"]),
        helper.make_node("Shape", ["input_ids"], ["gqa/ids_shape"]),
        helper.make_node("Slice", ["gqa/mask_shape", zero, one], ["gqa/batch"]),
        helper.make_node("Slice", ["gqa/mask_shape", one, two], ["gqa/total"]),
        helper.make_node("Slice", ["gqa/ids_shape", one, two], ["gqa/seq"]),
        helper.make_node("Cast", ["gqa/total"], ["gqa/total_int32"], to=TensorProto.INT32),
        helper.make_node("Squeeze", ["gqa/total_int32", zero], ["gqa/total_sequence_length"]),
        helper.make_node(
            "Sub", ["gqa/total_int32", constant("gqa/one_int32", np.array([1], np.int32))], ["gqa/last"]
        ),
        helper.make_node("Expand", ["gqa/last", "gqa/batch"], ["gqa/seqlens_k"]),
        helper.make_node("Cast", ["attention_mask"], ["gqa/mask_bool"], to=TensorProto.BOOL),
        helper.make_node(
            "Where",
            [
                "gqa/mask_bool",
                constant("gqa/zero_float", np.array(0.0, np.float32)),
                constant("gqa/lowest_float", np.array(np.finfo(np.float32).min, np.float32)),
            ],
            ["gqa/bias_keys"],
        ),
        helper.make_node(
            "Unsqueeze",
            ["gqa/bias_keys", constant("gqa/axes", np.array([1, 2], np.int64))],
            ["gqa/bias_b11t"],
        ),
        helper.make_node("Concat", ["gqa/batch", one, "gqa/seq", "gqa/total"], ["gqa/bias_shape"], axis=0),
        helper.make_node("Expand", ["gqa/bias_b11t", "gqa/bias_shape"], ["gqa/attention_bias"]),
    ]
    for node in shared:
        node.name = node.output[0]

    for o_proj, attention_output in rewired:
        o_proj.input[0] = attention_output
    for layer in range(layers):  # the old cache Concats become dead code
        for kind in ("key", "value"):
            concat = producer[f"present.{layer}.{kind}"]
            concat.output[0] = f"present.{layer}.{kind}/unfused"
    _shrink_rotary_caches(graph, caches, config)
    ordered = _topological([*graph.node, *shared, *added], graph)
    set_graph_nodes(model, ordered)
    return {"GroupQueryAttention": layers, "nodes_before": nodes_before, "nodes_after": len(graph.node)}


def _rotary_attributes(graph: Any, rotary_q: Any, rotary_k: Any, layer: int) -> dict[str, Any]:
    """The fused RotaryEmbedding attributes GQA's own rotary can take over: same caches for q and
    k, no scale, the whole head rotated (GQA has no attribute for either), and a head size that is
    a multiple of 16 (ONNX Runtime 1.32's CPU kernel fails on others: "head_size shall be a
    multiple of 16")."""
    from onnx import helper

    attributes = [
        {a.name: helper.get_attribute_value(a) for a in n.attribute if a.name != "num_heads"}
        for n in (rotary_q, rotary_k)
    ]
    if list(rotary_q.input[2:4]) != list(rotary_k.input[2:4]) or attributes[0] != attributes[1]:
        raise RotaryNotApplicable(f"layer {layer}: q and k are rotated differently")
    if attributes[0].get("scale", 1.0) != 1.0 or attributes[0].get("rotary_embedding_dim", 0):
        raise RotaryNotApplicable(f"layer {layer}: a scaled or partial rotary")
    cos_cache = next((init for init in graph.initializer if init.name == rotary_q.input[2]), None)
    if cos_cache is None or len(cos_cache.dims) != 2:
        raise RotaryNotApplicable(
            f"layer {layer}: the cos cache {rotary_q.input[2]} is not a 2-D initializer"
        )
    head_size = 2 * cos_cache.dims[1]
    if head_size % 16:
        raise RotaryNotApplicable(
            f"head size {head_size} is not a multiple of 16 (ONNX Runtime's CPU kernel)"
        )
    return attributes[0]


def _rotates_itself(node: Any) -> bool:
    """A GroupQueryAttention node that rotates q and k itself (do_rotary = 1)."""
    return node.op_type == "GroupQueryAttention" and any(
        a.name == "do_rotary" and a.i for a in node.attribute
    )


def feed_packed_qkv(model: Any) -> int:
    """A GQA that rotates q and k itself takes the packed q/k/v projection (key and value inputs
    left empty) instead of its Split: one node less per layer. Returns how many GQA nodes changed."""
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    splits = {
        node.output[0]: node for node in model.graph.node if node.op_type == "Split" and len(node.output) == 3
    }
    fed = 0
    for node in model.graph.node:
        split = splits.get(node.input[0]) if _rotates_itself(node) else None
        if split is None or list(node.input[:3]) != list(split.output):
            continue
        if any(consumers[name] != 1 for name in split.output):
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        fed += 1
    set_graph_nodes(model, list(model.graph.node))  # the Splits are dead now
    return fed


def slot_rotation_reference(model: Any, reference: Any) -> Any | None:
    """For a `model` whose GQA rotates by cache slot (`rotary_in_attention`): `reference` (a
    parity Reference in Hugging Face's cache format) seen in that model's format. Each row's pad
    count p (left padding: slot = position id + p) rotates the past keys by -p before the
    reference runs and its present keys by +p after; values and logits pass unchanged. None when
    no GQA of `model` rotates by itself."""
    import numpy as np
    from onnx import numpy_helper

    gqa = next((node for node in model.graph.node if _rotates_itself(node)), None)
    if gqa is None:
        return None
    by_name = {init.name: init for init in model.graph.initializer}
    cos, sin = (numpy_helper.to_array(by_name[name]).astype(np.float64) for name in gqa.input[7:9])
    interleaved = any(a.name == "rotary_interleaved" and a.i for a in gqa.attribute)

    def rotate(keys: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """keys [batch, heads, slots, head] rotated by shift[b] positions (RoPE composes additively)."""
        c = cos[np.abs(shift)][:, None, None, :]
        s = (sin[np.abs(shift)] * np.sign(shift)[:, None])[:, None, None, :]
        x = keys.astype(np.float64)
        if interleaved:
            even, odd = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2], out[..., 1::2] = even * c - odd * s, odd * c + even * s
        else:
            first, second = np.split(x, 2, axis=-1)
            out = np.concatenate([first * c - second * s, second * c + first * s], axis=-1)
        return out.astype(keys.dtype)

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = np.asarray(feeds["attention_mask"]).astype(bool)
        pads = (~mask).sum(axis=1)
        holes = [b for b, (row, pad) in enumerate(zip(mask, pads, strict=True)) if not row[pad:].all()]
        if holes:
            raise ValueError(f"slot_rotation_reference: attention_mask row {holes[0]} is not left padding")
        feeds = {
            name: rotate(value, -pads)
            if name.startswith("past_key_values.") and name.endswith(".key")
            else value
            for name, value in feeds.items()
        }
        outputs = dict(reference(feeds))
        for name, value in outputs.items():
            if name.startswith("present.") and name.endswith(".key"):
                outputs[name] = rotate(value, pads)
        return outputs

    return run


def _rotated(projection: str, fused: Any, heads: int, prefix: str) -> Any:
    """RotaryEmbedding of a [batch, seq, heads x head] projection, with the position ids, caches
    and attributes (interleaved, scale, rotary_embedding_dim) of the node ORT fused."""
    from onnx import helper

    attributes = {a.name: helper.get_attribute_value(a) for a in fused.attribute}
    attributes["num_heads"] = heads
    return helper.make_node(
        "RotaryEmbedding",
        [projection, *fused.input[1:4]],
        [f"{prefix}_rotated"],
        name=f"{prefix}_rotary",
        domain="com.microsoft",
        **attributes,
    )


def _check_config(config: dict[str, Any]) -> None:
    model_type = config.get("model_type")
    if model_type not in GQA_MODEL_TYPES:
        raise NotApplicable(f"model_type {model_type!r} (handled: {', '.join(GQA_MODEL_TYPES)})")
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        raise NotApplicable(f"sliding-window attention (sliding_window {config['sliding_window']})")
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "dynamic":
        raise NotApplicable("dynamic rope scaling (cos/sin depend on the sequence length)")


def _shrink_rotary_caches(graph: Any, caches: set[tuple[str, str]], config: dict[str, Any]) -> None:
    """ORT's rotary fusion writes cos/sin caches of a fixed 131,072 positions (33 MB for head 64);
    positions past the model's max_position_embeddings are never valid, so they are cut."""
    from onnx import numpy_helper

    limit = config.get("max_position_embeddings")
    if not limit:
        return
    names = {name for pair in caches for name in pair}
    for init in graph.initializer:
        if init.name in names and init.dims and init.dims[0] > limit:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:limit], init.name))


def _topological(nodes: list[Any], graph: Any) -> list[Any]:
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            missing = [n for n in waiting[0].input if n not in ready]
            raise NotApplicable(f"rewritten graph is not a DAG: {waiting[0].name} waits for {missing[:3]}")
        pending = waiting
    return ordered
