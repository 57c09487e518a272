"""Text generation (decoder LMs): KV-cache export parity (with and without past), greedy generation,
fusion, errors; perplexity (hand-checked cases, ONNX == PyTorch), the decode speed harness, the
validation composition, the tiny builder and the decoder recipes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import ROOT, export_decoder, held_out_texts, run_decoder_stage, shared_tokenizer, tiny_decoder

from pipeline.errors import InputError, ParityError

RECIPES = ROOT / "recipes"
ARCHS = ["gpt2", "llama"]


# ---------------------------------------------------------------------- export, parity, generation


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
    from pipeline.tasks.text_generation.generate import GREEDY_BATCH, greedy_agreement, prompts_from_texts

    _, hf, onnx_dir = decoder
    model = get_task("text-generation").load_model(hf)
    prompts = prompts_from_texts(shared_tokenizer(), held_out_texts(), 4, min_len=5, max_len=20)
    result = greedy_agreement(model, open_session(onnx_dir / "model.onnx"), prompts, 12)
    assert result["prompts"] == 4 and result["new_tokens"] == 12
    assert result["batch_size"] == GREEDY_BATCH  # one left-padded batch, prompts of 5..20 tokens
    assert result["token_agreement"] == 1.0 and result["exact_sequences"] == 1.0
    # Not a degenerate model that repeats one token: the agreement means something.
    assert max(len(set(s["onnx"])) for s in result["samples"]) > 3


def test_agreement_stops_generating_at_the_first_divergence(decoder):
    """A reference that differs at step 3: the loop stops there (the rest padded), and the
    agreement counts the 3 matching tokens, as it would had all 12 been generated."""
    from pipeline.onnx.session import open_session
    from pipeline.tasks import get_task
    from pipeline.tasks.text_generation.generate import PAD, OnnxGreedyGenerator, greedy_agreement

    _, hf, onnx_dir = decoder
    session = open_session(onnx_dir / "model.onnx")
    prompt = [5, 17, 99, 4, 250]
    full = OnnxGreedyGenerator(session).generate(np.asarray([prompt]), 12, pad_token_id=PAD)[0].tolist()
    wrong = full[:3] + [(full[3] + 1) % 50] + full[4:]
    stopped = (
        OnnxGreedyGenerator(session)
        .generate(np.asarray([prompt]), 12, pad_token_id=PAD, until_diverging_from=[wrong])[0]
        .tolist()
    )
    assert stopped == full[:4] + [PAD] * 8
    # In a batch each row stops at its own divergence: the row with the right reference runs on.
    both = OnnxGreedyGenerator(session).generate(
        np.asarray([prompt, prompt]), 12, pad_token_id=PAD, until_diverging_from=[wrong, full]
    )
    assert both.tolist() == [full[:4] + [PAD] * 8, full]
    model = get_task("text-generation").load_model(hf)
    result = greedy_agreement(model, session, [prompt], 12, references=[wrong])
    assert result["token_agreement"] == 3 / 12 and result["first_divergence"] == [3]
    with pytest.raises(InputError, match="2 references for 1 prompts"):
        greedy_agreement(model, session, [prompt], 12, references=[wrong, wrong])


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
    plain = {"require_attention_fusion": False, "group_query_attention": False}
    stats = run_decoder_stage("optimize", plain, onnx_dir, tmp_path / "f", parity)
    # Measured on onnxruntime 1.32 + optimum-onnx 0.1.0: ORT fuses no attention for either family.
    assert stats["attention_fused"] == 0 and stats["attention_fusion"] == "not available"
    assert "not available" in stats["note"] and stats["attention_rewrite"]["applied"] is False
    if arch == "gpt2":
        assert stats["fused_ops"]["FastGelu"] == 2 and stats["fused_ops"]["SkipLayerNormalization"] == 4
    else:
        assert stats["fused_ops"]["RotaryEmbedding"] == 4
    assert stats["parity"]["max_abs_diff"] < 1e-3
    assert (tmp_path / "f" / "model.onnx").is_file() and (tmp_path / "f" / "config.json").is_file()
    if arch == "gpt2":
        with pytest.raises(StageError, match="attention fusion fell short"):
            run_decoder_stage("optimize", {}, onnx_dir, tmp_path / "strict", parity)


def test_group_query_attention_replaces_each_layer(decoder, tmp_path):
    """Llama / Qwen2: one GroupQueryAttention per layer, the unfused graph's I/O, parity with it on
    prompts with left-padded rows and on decode steps after a past, and the same greedy tokens."""
    import onnx

    from pipeline.errors import InputError
    from pipeline.onnx.session import open_session
    from pipeline.tasks.text_generation.generate import OnnxGreedyGenerator

    arch, _, onnx_dir = decoder
    parity = {"shapes": [[3, 2], [3, 9], [3, 9]], "past_lens": [1, 17]}
    if arch == "gpt2":
        with pytest.raises(InputError, match="group_query_attention: does not apply .* model_type 'gpt2'"):
            run_decoder_stage("optimize", {"group_query_attention": True}, onnx_dir, tmp_path / "g", parity)
        return
    stats = run_decoder_stage("optimize", {}, onnx_dir, tmp_path / "g", parity)  # attention required
    rewrite = stats["attention_rewrite"]
    assert rewrite["applied"] and rewrite["GroupQueryAttention"] == 2
    assert rewrite["matmuls_packed"] == 4  # q/k/v and gate/up of each layer
    assert rewrite["nodes_after"] < rewrite["nodes_before"] / 3
    assert stats["attention_fusion"] == "full" and stats["fused_ops"]["GroupQueryAttention"] == 2
    assert stats["parity"]["max_abs_diff"] < 1e-4 and stats["parity"]["argmax_agreement"] == 1.0
    fused, unfused = (onnx.load(str(d / "model.onnx")) for d in (tmp_path / "g", onnx_dir))
    assert [i.name for i in fused.graph.input] == [i.name for i in unfused.graph.input]
    assert [o.name for o in fused.graph.output] == [o.name for o in unfused.graph.output]
    assert not any(n.op_type in ("Softmax", "Expand") and "self_attn" in n.name for n in fused.graph.node)
    assert sum(n.op_type == "MatMul" for n in fused.graph.node) == 2 * 4 + 1  # packed, o, down; head
    prompts = np.array([[0, 0, 5, 17, 99], [8, 3, 5, 17, 99]])  # row 0 left-padded
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    new, old = (
        OnnxGreedyGenerator(open_session(d / "model.onnx")).generate(prompts, 8, attention_mask=mask)
        for d in (tmp_path / "g", onnx_dir)
    )
    np.testing.assert_array_equal(new, old)


def test_rotary_in_attention_rotates_by_cache_slot(tmp_path_factory, tmp_path):
    """rotary_in_attention on a Llama with head size 16: GQA rotates q/k itself and reads the
    packed q/k/v whole (no RotaryEmbedding, no q/k/v Split). Logits stay the unfused model's; a
    left-padded row's cached keys are rotated by its pad count, which parity against the unfused
    model sees unless the reference is put into the slot format; greedy tokens are the same."""
    import onnx

    from pipeline.onnx.parity import parity_grid, session_reference
    from pipeline.onnx.session import open_session
    from pipeline.tasks.text_generation.adapter import parity_cases
    from pipeline.tasks.text_generation.attention import slot_rotation_reference
    from pipeline.tasks.text_generation.generate import OnnxGreedyGenerator
    from pipeline.zoo.tiny_decoder import build_tiny_decoder

    base = tmp_path_factory.mktemp("decoder-head16")
    hf = build_tiny_decoder(
        base / "hf", "llama", tokenizer=shared_tokenizer(), hidden_size=64, initializer_range=0.2
    )
    export_decoder(hf, base / "onnx", parity={"shapes": [[2, 1], [2, 9], [2, 9]], "past_lens": [1, 17]})
    parity = {"shapes": [[3, 2], [3, 9], [3, 9]], "past_lens": [1, 17]}
    stats = run_decoder_stage(
        "optimize", {"rotary_in_attention": True}, base / "onnx", tmp_path / "r", parity
    )
    rewrite = stats["attention_rewrite"]
    assert rewrite["rotary_in_attention"] is True and rewrite["packed_qkv_into_attention"] == 2
    assert stats["parity"]["max_abs_diff"] < 1e-4 and stats["parity"]["argmax_agreement"] == 1.0
    fused = onnx.load(str(tmp_path / "r" / "model.onnx"))
    ops = [n.op_type for n in fused.graph.node]
    assert "RotaryEmbedding" not in ops and ops.count("Split") == 2  # gate/up only
    gqa = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(list(n.input[1:3]) == ["", ""] for n in gqa)  # packed q/k/v

    session, unfused = open_session(tmp_path / "r" / "model.onnx"), open_session(base / "onnx" / "model.onnx")
    cases = parity_cases(session, [[3, 9]], 1000, [17])
    with pytest.raises(ParityError, match=r"\(present\) exceeds atol"):  # padded rows' keys are rotated
        parity_grid(session_reference(unfused), session, cases, 1e-4)
    slot_format = slot_rotation_reference(fused, session_reference(unfused))
    assert parity_grid(slot_format, session, cases, 1e-4)["max_abs_diff"] < 1e-4

    prompts = np.array([[0, 0, 0, 5, 17, 99], [8, 3, 4, 5, 17, 99], [0, 9, 4, 5, 17, 99]])
    mask = (prompts != 0).astype(np.int64)
    new, old = (OnnxGreedyGenerator(s).generate(prompts, 12, attention_mask=mask) for s in (session, unfused))
    np.testing.assert_array_equal(new, old)


def test_rotary_in_attention_needs_head_size_16(decoder, tmp_path):
    """Head size 8 (ORT's CPU kernel rotates only multiples of 16): None keeps RotaryEmbedding
    nodes before GQA and says why; true is a one-line error."""
    arch, _, onnx_dir = decoder
    if arch == "gpt2":
        return
    stats = run_decoder_stage("optimize", {"rotary_in_attention": None}, onnx_dir, tmp_path / "auto")
    rewrite = stats["attention_rewrite"]
    assert rewrite["applied"] and rewrite["rotary_in_attention"] is False
    assert "head size 8 is not a multiple of 16" in rewrite["rotary_in_attention_reason"]
    assert stats["fused_ops"]["RotaryEmbedding"] == 4 and stats["parity"]["max_abs_diff"] < 1e-4
    with pytest.raises(InputError, match="optimize.rotary_in_attention: does not apply .* head size 8"):
        run_decoder_stage("optimize", {"rotary_in_attention": True}, onnx_dir, tmp_path / "strict")
    assert not (tmp_path / "strict" / "model.onnx").exists()


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


# ----------------------------------------- perplexity, decode timing, validation, builder, recipes


def _uniform(vocab):
    return lambda ids: np.zeros((1, ids.shape[1], vocab), dtype=np.float32)


def _bigram(table):
    """A 'model' whose next-token distribution depends on the current token only: log table[row]."""
    log_table = np.log(table)
    return lambda ids: log_table[ids[0]][None, :, :]


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    from pipeline.tasks.text_generation.perplexity import perplexity

    result = perplexity(_uniform(50), np.arange(37) % 50, window=8, stride=3)
    assert result["perplexity"] == pytest.approx(50.0, rel=1e-12)
    assert result["tokens_scored"] == 36  # every token but the first, exactly once


@pytest.mark.parametrize("window,stride", [(2, 1), (5, 2), (8, 7), (64, 32)])
def test_perplexity_of_a_bigram_model_matches_the_hand_computation(window, stride):
    from pipeline.tasks.text_generation.perplexity import perplexity

    # Three tokens; after 0 comes 1 with p=0.5, after 1 comes 2 with p=0.25, after 2 comes 0 with p=0.8.
    table = np.array([[0.25, 0.5, 0.25], [0.5, 0.25, 0.25], [0.8, 0.1, 0.1]])
    ids = np.array([0, 1, 2, 0, 1, 2, 0])
    # By hand: 2 x (0.5 * 0.25 * 0.8) for the 6 transitions -> ppl = (0.1 ** 2) ** (-1/6).
    expected = (0.1**2) ** (-1 / 6)
    result = perplexity(_bigram(table), ids, window=window, stride=stride)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-9)
    assert result["tokens_scored"] == 6


def test_perplexity_uses_the_context_a_window_gives():
    """A model that is certain of the next token once it sees 3 tokens (itself and 2 before), else
    uniform: windows of 3 never give it that context, windows of 4 with stride 1 always do."""
    from pipeline.tasks.text_generation.perplexity import perplexity

    vocab = 4

    def needs_context(ids):
        logits = np.zeros((1, ids.shape[1], vocab))
        logits[0, 2:, :] = -30.0
        positions = np.arange(2, ids.shape[1])
        logits[0, positions, (ids[0, positions] + 1) % vocab] = 30.0  # certain from position 2 on
        return logits

    ids = np.arange(40) % vocab
    short = perplexity(needs_context, ids, window=3, stride=1)
    sliding = perplexity(needs_context, ids, window=4, stride=1)
    whole = perplexity(needs_context, ids, window=40)
    assert short["perplexity"] == pytest.approx(4.0, rel=1e-9)
    # Only tokens 1 and 2 are predicted without enough context: NLL 2 ln 4 over 39 tokens.
    assert whole["perplexity"] == pytest.approx(math.exp(2 * math.log(4) / 39), rel=1e-6)
    assert sliding["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)
    assert short["tokens_scored"] == sliding["tokens_scored"] == whole["tokens_scored"] == 39
    assert sliding["windows"] == 37


def test_perplexity_rejects_bad_input():
    from pipeline.tasks.text_generation.perplexity import perplexity

    with pytest.raises(InputError, match="at least 2 tokens"):
        perplexity(_uniform(5), [1], window=4)
    with pytest.raises(InputError, match=r"stride must be in 1\.\.3 \(below the window\), got 5"):
        perplexity(_uniform(5), [1, 2, 3], window=4, stride=5)
    # stride == window would score each window's first token with no context at all.
    with pytest.raises(InputError, match="got 4"):
        perplexity(_uniform(5), [1, 2, 3], window=4, stride=4)
    with pytest.raises(InputError, match="window must be >= 2"):
        perplexity(_uniform(5), [1, 2, 3], window=1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_onnx_and_pytorch_perplexity_agree_on_the_same_tokens(tmp_path_factory, arch):
    from pipeline.onnx.session import open_session
    from pipeline.tasks import get_task
    from pipeline.tasks.text_generation.perplexity import (
        onnx_logits_fn,
        perplexity,
        text_token_ids,
        torch_logits_fn,
    )

    hf, onnx_dir = tiny_decoder(tmp_path_factory, arch)
    ids = text_token_ids(shared_tokenizer(), held_out_texts(3), max_tokens=600)
    torch_ppl = perplexity(torch_logits_fn(get_task("text-generation").load_model(hf)), ids, 96, 48)
    onnx_ppl = perplexity(onnx_logits_fn(open_session(onnx_dir / "model.onnx")), ids, 96, 48)
    assert onnx_ppl["perplexity"] == pytest.approx(torch_ppl["perplexity"], rel=1e-5)
    assert onnx_ppl["tokens_scored"] == torch_ppl["tokens_scored"] == ids.size - 1


def test_decode_timing_reports_every_backend_and_context(tmp_path_factory):
    from pipeline.bench import summarize, time_shapes
    from pipeline.onnx.session import open_session
    from pipeline.tasks import get_task

    task = get_task("text-generation")
    hf, onnx_dir = tiny_decoder(tmp_path_factory, "gpt2")
    runners = {"pytorch": task.load_model(hf), "fp32": open_session(onnx_dir / "model.onnx", threads=1)}
    times, quality = time_shapes(
        runners,
        [(1, 4), (1, 16)],
        lambda runner, batch, seq: task.timing_calls(runner, batch, seq, 1000),
        warmup=1,
        iters=2,
        block=20,
        settle=0,
    )
    assert set(quality) == {"b1_s4", "b1_s16"} and all(q["rounds"] == 1 for q in quality.values())
    for name in runners:
        assert set(times[name]) == {"b1_s4", "b1_s16"}
        calls = times[name]["b1_s16"]
        assert set(calls) == {"prefill", "decode"} and len(calls["decode"]) == 2
        row = task.latency_entry({c: summarize(ms, 1) for c, ms in calls.items()}, 1, 16)
        assert row["p90_ms"] >= row["p50_ms"] > 0 and row["prompt_tokens_per_s"] > 0
        assert row["throughput_per_s"] == pytest.approx(1e3 / row["p50_ms"], rel=1e-3)


def test_validate_decoder_flags_random_weights(tmp_path_factory, tmp_path):
    from pipeline.data import DataBundle, TextExample
    from pipeline.stages.registry import run_stage
    from pipeline.stages.validate import load_measurements

    hf, onnx_dir = tiny_decoder(tmp_path_factory, "llama")
    run_decoder_stage("quantize", {"mode": "dynamic"}, onnx_dir, tmp_path / "int8")
    data = DataBundle.from_examples("text-generation", eval=[TextExample(t) for t in held_out_texts(3)])
    latency = {"batch_sizes": [1], "seq_lens": [8], "warmup": 0, "iters": 1, "threads": 1}
    run_stage(
        "validate",
        {"latency": latency, "measure_memory": False},
        hf,
        tmp_path / "measured",
        model={"source": str(hf), "task": "text-generation"},
        data=data,
        variants={"fp32": (onnx_dir, []), "int8": (tmp_path / "int8", [])},
    )
    result = load_measurements(tmp_path / "measured")
    assert result["settings"]["random_weights"] is True
    assert any("random weights" in note for note in result["notes"])
    fp32, int8 = result["variants"]["fp32"], result["variants"]["int8"]
    assert fp32["metrics"]["perplexity"] == pytest.approx(result["baseline"]["metric"], rel=1e-5)
    assert fp32["agreement"] == 1.0 and 0 <= int8["agreement"] <= 1
    for entry in (result["baseline"], fp32, int8):
        assert set(entry["latency"]) == {"b1_s8"} and entry["latency"]["b1_s8"]["prefill_ms_p50"] > 0
    assert set(fp32["prefill_speedup_vs_pytorch"]) == {"b1_s8"}
    json.dumps(result)  # manifest-ready


def test_tiny_builder_records_training(tmp_path):
    from pipeline.model_source import random_weights
    from pipeline.zoo.tiny_decoder import build_tiny_decoder

    folder = build_tiny_decoder(tmp_path / "m", "qwen2", tokenizer=shared_tokenizer(), train_steps=2)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["pipeline_train_steps"] == 2
    assert random_weights(folder) is False
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    with pytest.raises(InputError, match="train_steps must be >= 0"):
        build_tiny_decoder(tmp_path / "n", "gpt2", tokenizer=shared_tokenizer(), train_steps=-1)


@pytest.mark.parametrize("name", ["tiny-gpt2-offline.yaml", "gpt2.yaml", "qwen2.5-0.5b.yaml"])
def test_decoder_recipes_pass_check(name):
    from pipeline.config import load_recipe

    recipe = load_recipe(RECIPES / name)
    assert recipe.model.task == "text-generation"
    text = (RECIPES / name).read_text()
    if name != "tiny-gpt2-offline.yaml":
        assert text.startswith("# NEEDS A NETWORK")
    else:
        assert recipe.model.source.startswith("./")  # a local folder, never a hub id


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_genai_config_names_the_graph_io(tmp_path_factory, tmp_path, arch):
    """genai_config.json (written into decoder bundles) matches the exported graph: every input and
    output name it gives exists, per layer, and the head sizes follow the config."""
    import importlib.util
    import json
    import shutil

    import onnx

    from pipeline.onnx.io import read_config
    from pipeline.tasks.text_generation.genai import write_genai_config

    hf, onnx_dir = tiny_decoder(tmp_path_factory, arch)
    folder = tmp_path / "bundle"
    shutil.copytree(onnx_dir, folder)
    config = json.loads(write_genai_config(folder).read_text())
    decoder = config["model"]["decoder"]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    layers = decoder["num_hidden_layers"]
    named = decoder["inputs"]
    assert named["input_ids"] in inputs and named["attention_mask"] in inputs
    assert ("position_ids" in named) == ("position_ids" in inputs)
    for layer in range(layers):
        assert named["past_key_names"] % layer in inputs and named["past_value_names"] % layer in inputs
        assert decoder["outputs"]["present_key_names"] % layer in outputs
    assert len([n for n in inputs if n.startswith("past_key_values.")]) == 2 * layers
    hf_config = read_config(hf)
    assert decoder["hidden_size"] == hf_config.get("hidden_size", hf_config.get("n_embd"))
    assert config["model"]["vocab_size"] == hf_config["vocab_size"]
    assert config["search"]["past_present_share_buffer"] is False
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return  # the runtime itself is in the peers extra (make bench)
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    generator = og.Generator(model, og.GeneratorParams(model))
    generator.append_tokens([[5, 6, 7]])
    generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 4


def test_group_query_attention_handles_projection_biases(tmp_path_factory, tmp_path):
    """Qwen2's q/k/v projections carry biases (MatMul + Add): the rewrite starts after them."""
    from helpers import tiny_decoder

    _, onnx_dir = tiny_decoder(tmp_path_factory, "qwen2")
    parity = {"shapes": [[3, 2], [3, 9], [3, 9]], "past_lens": [1, 17]}
    stats = run_decoder_stage("optimize", {"group_query_attention": True}, onnx_dir, tmp_path / "g", parity)
    assert stats["attention_rewrite"]["GroupQueryAttention"] == 2
    assert stats["parity"]["max_abs_diff"] < 1e-4 and stats["parity"]["argmax_agreement"] == 1.0
