"""The GenAI builder's models in `bench`: their symbolic KV head dimension is made a number."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_decoder


def test_a_symbolic_head_dimension_is_read_from_genai_config(tmp_path_factory, tmp_path):
    """The builder names the past's head dimension 'kv_cache_dim': this package's loop could not
    make an empty past for it (InputError). With the head size from genai_config.json the same
    graph generates exactly what it generates with the number in place."""
    import onnx

    from pipeline.errors import InputError
    from pipeline.onnx.session import open_session
    from pipeline.peers.decoder import with_genai_dims
    from pipeline.tasks.text_generation.generate import OnnxGreedyGenerator

    _, onnx_dir = tiny_decoder(tmp_path_factory, "gpt2")
    model = onnx.load(str(onnx_dir / "model.onnx"))
    head_dim = None
    for graph_input in model.graph.input:
        if graph_input.name.startswith("past_key_values."):
            dim = graph_input.type.tensor_type.shape.dim[3]
            head_dim = dim.dim_value
            dim.ClearField("dim_value")
            dim.dim_param = "kv_cache_dim"
    assert head_dim
    folder = tmp_path / "genai"
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"head_size": head_dim}}}))

    symbolic = open_session(folder / "model.onnx")
    with pytest.raises(InputError, match="kv_cache_dim"):
        OnnxGreedyGenerator(symbolic)
    prompt = np.asarray([[5, 17, 99, 4, 250]])
    expected = OnnxGreedyGenerator(open_session(onnx_dir / "model.onnx")).generate(prompt, 6)
    fixed = with_genai_dims(symbolic, folder)
    past = next(i for i in fixed.get_inputs() if i.name == "past_key_values.0.key")
    assert past.shape[3] == head_dim
    np.testing.assert_array_equal(OnnxGreedyGenerator(fixed).generate(prompt, 6), expected)
    # A session with nothing symbolic there is returned as it is.
    plain = open_session(onnx_dir / "model.onnx")
    assert with_genai_dims(plain, folder) is plain


def test_decoder_summary_names_the_fastest_variant_no_worse_than_genai_int4():
    """The decode target's bar: among pipeline variants whose perplexity is no worse than the
    builder's int4, the fastest at the last context, with its ratio (and interval) per context."""
    from pipeline.peers.decoder import render_decoder_section, summarize_decoder

    def row(ppl, ms128, ms256, **extra):
        latency = {
            k: {"p50_ms": ms, "prefill_ms_p50": None} for k, ms in (("b1_s128", ms128), ("b1_s256", ms256))
        }
        return {"what": "x", "metrics": {"perplexity": ppl}, "latency": latency, **extra}

    candidates = {
        "pytorch-eager-fp32": row(30.0, 70.0, 80.0),
        "pipeline:int4-hqq": row(30.0, 17.0, 20.0, released=True),
        "pipeline:int4-head4": row(38.0, 11.0, 16.0, decode_vs_genai_int4_ci={"b1_s256": [0.9, 1.1]}),
        "pipeline:int4-tiny": row(45.0, 5.0, 5.0),  # faster, but worse than the peer: not eligible
        "genai-builder-int4": row(39.0, 12.0, 16.0),
    }
    result = {
        "recipe": "r",
        "task": "text-generation",
        "generated_at": "now",
        "machine": {},
        "settings": {
            "shapes": ["b1_s128", "b1_s256"],
            "threads": 2,
            "iters": 4,
            "block": 2,
            "generation": {},
        },
        "candidates": candidates,
    }
    summary = summarize_decoder(result)
    best = summary["best_vs_genai_int4"]
    assert best["variant"] == "pipeline:int4-head4" and best["ratio"] == {"b1_s128": 1.091, "b1_s256": 1.0}
    assert summary["released_vs_genai_int4"] == {"b1_s128": 0.706, "b1_s256": 0.8}
    result["summary"] = summary
    text = render_decoder_section(result)
    assert (
        "`pipeline:int4-head4` (38.000), decode speed vs that int4: "
        "1.09x at b1_s128, 1.00x at b1_s256 [0.90, 1.10]" in text
    )
