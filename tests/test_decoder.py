"""Decoder LMs: KV-cache export parity (with and without past), greedy generation, fusion, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import export_decoder, held_out_texts, run_decoder_stage, shared_tokenizer, tiny_decoder

from pipeline.errors import InputError, ParityError

ARCHS = ["gpt2", "llama"]


@pytest.fixture(scope="module", params=ARCHS)
def decoder(request, tmp_path_factory):
    return request.param, *tiny_decoder(tmp_path_factory, request.param)


def test_export_parity_with_and_without_past(decoder, tmp_path):
    arch, hf, _ = decoder
    metrics = export_decoder(
        hf,
        tmp_path / "onnx",
        18,
        {"atol": 1e-4, "shapes": [[2, 1], [2, 5], [2, 12]], "past_lens": [1, 6, 20]},
    )
    parity = metrics["parity"]
    pasts = [case["past"] for case in parity["cases"]]
    assert pasts.count(0) == 3 and sorted(p for p in pasts if p) == [1, 6, 20]
    assert parity["max_abs_diff_logits"] < 1e-4 and parity["max_abs_diff_present"] < 1e-4
    assert parity["argmax_agreement"] == 1.0
    assert metrics["layers"] == 2 and metrics["random_weights"] is True
    assert "past_key_values.0.key" in metrics["inputs"] and "present.1.value" in metrics["outputs"]
    # One model for prompt and decode: no separate decoder_with_past file.
    assert sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx")) == ["model.onnx"]
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "onnx" / "config.json").read_text())["pipeline_random_weights"] is True
    if arch == "gpt2":  # Conv1D layers exported as Gemm are rewritten so quantizers reach them
        assert metrics["gemm_rewritten_as_matmul"] == 8 and metrics["lm_head_tied"] is True
        assert "Gemm" not in metrics["op_counts"]


def _tamper_present(onnx_dir, out_dir, name="present.1.value", factor=1.001):
    """Copy of the export whose `name` output (only) is scaled: logits stay exact."""
    import shutil

    import onnx

    shutil.copytree(onnx_dir, out_dir)
    model = onnx.load(str(out_dir / "model.onnx"))
    internal = name + "_internal"
    for node in model.graph.node:
        for i, value in enumerate(node.input):
            if value == name:
                node.input[i] = internal
        for i, value in enumerate(node.output):
            if value == name:
                node.output[i] = internal
    scale = onnx.helper.make_tensor("tamper_scale", onnx.TensorProto.FLOAT, [], [factor])
    model.graph.initializer.append(scale)
    model.graph.node.append(onnx.helper.make_node("Mul", [internal, "tamper_scale"], [name]))
    onnx.save(model, str(out_dir / "model.onnx"))
    return out_dir / "model.onnx"


def test_parity_checks_present_outputs_not_only_logits(decoder, tmp_path):
    from pipeline.onnx.parity import parity_grid
    from pipeline.onnx.session import open_session
    from pipeline.tasks import get_task

    _, hf, onnx_dir = decoder
    task = get_task("text-generation")
    session = open_session(_tamper_present(onnx_dir, tmp_path / "bad"))
    cases = task.parity_cases(session, [[2, 4]], 1000, past_lens=[3])
    with pytest.raises(ParityError, match=r"\(present\) exceeds atol"):
        parity_grid(task.torch_reference(task.load_model(hf), session), session, cases, 1e-5)


def test_fp32_greedy_generation_agrees_fully_with_pytorch(decoder):
    from pipeline.onnx.session import open_session
    from pipeline.tasks import get_task
    from pipeline.tasks.text_generation.generate import greedy_agreement, prompts_from_texts

    _, hf, onnx_dir = decoder
    model = get_task("text-generation").load_model(hf)
    prompts = prompts_from_texts(shared_tokenizer(), held_out_texts(), 4, min_len=5, max_len=20)
    result = greedy_agreement(model, open_session(onnx_dir / "model.onnx"), prompts, 12)
    assert result["prompts"] == 4 and result["new_tokens"] == 12
    assert result["token_agreement"] == 1.0 and result["exact_sequences"] == 1.0
    # Not a degenerate model that repeats one token: the agreement means something.
    assert max(len(set(s["onnx"])) for s in result["samples"]) > 3


def test_batched_left_padded_generation_equals_one_at_a_time(decoder):
    from pipeline.onnx.session import open_session
    from pipeline.tasks.text_generation.generate import OnnxGreedyGenerator

    _, _, onnx_dir = decoder
    generator = OnnxGreedyGenerator(open_session(onnx_dir / "model.onnx"))
    prompts = [[5, 17, 99, 4, 250, 31], [7, 8], [400, 3, 12, 901]]
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = generator.generate(ids, 8, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        np.testing.assert_array_equal(batched[row], generator.generate(np.array([prompt]), 8)[0])


def test_generation_stops_at_eos(decoder):
    from pipeline.onnx.session import open_session
    from pipeline.tasks.text_generation.generate import OnnxGreedyGenerator

    _, _, onnx_dir = decoder
    generator = OnnxGreedyGenerator(open_session(onnx_dir / "model.onnx"))
    free = generator.generate(np.array([[5, 17, 99]]), 6)[0]
    stopped = generator.generate(np.array([[5, 17, 99]]), 6, eos_token_id=int(free[2]), pad_token_id=-1)[0]
    first = list(free).index(free[2])
    assert list(stopped[: first + 1]) == list(free[: first + 1])
    assert (stopped[first + 1 :] == -1).all()


def test_fusion_stats_are_measured(decoder, tmp_path):
    from pipeline.errors import StageError

    arch, _, onnx_dir = decoder
    parity = {"shapes": [[2, 3], [2, 3], [2, 3]], "past_lens": [4]}
    stats = run_decoder_stage(
        "optimize", {"require_attention_fusion": False}, onnx_dir, tmp_path / "f", parity
    )
    # Measured on onnxruntime 1.32 + optimum-onnx 0.1.0: no attention fusion for either family.
    assert stats["attention_fused"] == 0 and stats["attention_fusion"] == "not available"
    assert "not available" in stats["note"]
    if arch == "gpt2":
        assert stats["fused_ops"]["FastGelu"] == 2 and stats["fused_ops"]["SkipLayerNormalization"] == 4
    else:
        assert stats["fused_ops"]["RotaryEmbedding"] == 4
    assert stats["parity"]["max_abs_diff"] < 1e-3
    assert (tmp_path / "f" / "model.onnx").is_file() and (tmp_path / "f" / "config.json").is_file()
    with pytest.raises(StageError, match="attention fusion fell short"):
        run_decoder_stage("optimize", {}, onnx_dir, tmp_path / "strict", parity)


def test_export_without_past_is_a_clear_error(decoder, tmp_path):
    """A decoder exported without the KV cache (optimum task text-generation) is refused by name."""
    from optimum.exporters.onnx import main_export

    from pipeline.onnx.session import open_session
    from pipeline.tasks.text_generation.generate import OnnxGreedyGenerator
    from pipeline.tasks.text_generation.io import DecoderIO

    _, hf, _ = decoder
    main_export(str(hf), str(tmp_path / "no-past"), task="text-generation", do_validation=False)
    session = open_session(tmp_path / "no-past" / "model.onnx")
    with pytest.raises(InputError, match="no KV cache.*text-generation-with-past"):
        DecoderIO.from_session(session, "no-past")
    with pytest.raises(InputError, match="no KV cache"):
        OnnxGreedyGenerator(session)


def test_export_errors_are_one_line(tmp_path):
    from pipeline.zoo.tiny_decoder import build_tiny_decoder

    with pytest.raises(InputError, match="no config.json"):
        export_decoder(tmp_path, tmp_path / "out")
    with pytest.raises(InputError, match="unknown arch 'bert'"):
        build_tiny_decoder(tmp_path / "x", "bert")
    with pytest.raises(ValueError, match="past lengths >= 1"):
        export_decoder(tmp_path, tmp_path / "out", parity={"past_lens": [0]})


def test_generator_rejects_bad_requests(decoder):
    from pipeline.onnx.session import open_session
    from pipeline.tasks.text_generation.generate import OnnxGreedyGenerator

    generator = OnnxGreedyGenerator(open_session(decoder[2] / "model.onnx"))
    with pytest.raises(InputError, match="max_new_tokens"):
        generator.generate(np.array([[1, 2]]), 0)
    with pytest.raises(InputError, match="attention_mask shape"):
        generator.generate(np.array([[1, 2]]), 2, attention_mask=np.ones((1, 3)))


def test_qwen2_export_parity_and_generation(tmp_path_factory):
    """Qwen2 (q/k/v biases, grouped-query attention with 2 KV heads for 4 query heads)."""
    from pipeline.onnx.session import open_session
    from pipeline.tasks import get_task
    from pipeline.tasks.text_generation.generate import greedy_agreement

    hf, onnx_dir = tiny_decoder(tmp_path_factory, "qwen2")
    session = open_session(onnx_dir / "model.onnx")
    past = next(i for i in session.get_inputs() if i.name == "past_key_values.0.key")
    assert past.shape[1] == 2  # KV heads, not the 4 query heads
    result = greedy_agreement(get_task("text-generation").load_model(hf), session, [[5, 17, 99, 4, 250]], 10)
    assert result["token_agreement"] == 1.0
