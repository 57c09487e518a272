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
