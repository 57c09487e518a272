"""pipeline.onnx.lora: one exported decoder, LoRA adapters swapped per call by ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import held_out_texts, shared_tokenizer, tiny_decoder

from pipeline.config.finetune import LoraSettings
from pipeline.errors import InputError
from pipeline.onnx import lora as ort_lora
from pipeline.onnx.io import save_onnx
from pipeline.onnx.session import open_session
from pipeline.tasks import get_task
from pipeline.tasks.text_generation.perplexity import onnx_logits_fn, text_token_ids, torch_logits_fn
from pipeline.training.lora import adapter_modules, train_lm_adapter

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("peft")

SETTINGS = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """The tiny Llama's export rewritten with LoRA inputs, two trained adapters and their torch models."""
    hf, onnx_dir = tiny_decoder(tmp_path_factory, "llama")
    task = get_task("text-generation")
    ids = text_token_ids(shared_tokenizer(), held_out_texts(6), 4000)
    models, handles, stats = {}, {}, {}
    for name, seed in (("one", 0), ("two", 1)):
        torch.manual_seed(seed)
        model = task.load_model(hf).float()
        handles[name], stats[name] = train_lm_adapter(
            model, ids, SETTINGS, steps=8, lr=2e-2, window=32, batch_size=4, seed=seed
        )
        models[name] = model
    proto = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=True)
    modules = adapter_modules(models["one"])
    slots = ort_lora.add_lora_inputs(proto, modules)
    folder = tmp_path_factory.mktemp("lora")
    (folder / "base").mkdir()
    base = save_onnx(proto, folder / "base")
    files = {
        name: ort_lora.write_adapter(
            folder / f"{name}.onnx_adapter",
            ort_lora.adapter_tensors(model.state_dict(), slots, SETTINGS.alpha / SETTINGS.r),
        )
        for name, model in models.items()
    }
    return {
        "hf": hf,
        "onnx_dir": onnx_dir,
        "base": base,
        "files": files,
        "models": models,
        "slots": slots,
        "modules": modules,
        "stats": stats,
    }


def test_the_adapters_train_only_their_low_rank_weights(adapted):
    stats = adapted["stats"]["one"]
    assert stats["adapted"] == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    layers = len([m for m in adapted["modules"] if m.endswith("q_proj")])
    assert len(adapted["modules"]) == 3 * layers and len(adapted["slots"]) == 3 * layers
    assert stats["trainable_parameters"] < 0.2 * stats["total_parameters"]
    assert stats["loss_last"] < stats["loss_first"]


def test_one_session_serves_the_base_and_each_adapter(adapted):
    ids = np.asarray(text_token_ids(shared_tokenizer(), held_out_texts(1), 40))[None, :40]
    plain = onnx_logits_fn(open_session(adapted["onnx_dir"] / "model.onnx"))(ids)
    session = ort_lora.AdaptedSession(open_session(adapted["base"]))
    # the rewritten graph without an adapter is the base model, to the bit (rank-0 branches add 0)
    assert np.array_equal(onnx_logits_fn(session)(ids), plain)
    assert [i.name for i in session.get_inputs()] == [
        i.name for i in open_session(adapted["onnx_dir"] / "model.onnx").get_inputs()
    ]
    for name, path in adapted["files"].items():
        session.load(name, path)
    seen = {}
    for name in ("one", "two", "one"):
        session.activate(name)
        logits = onnx_logits_fn(session)(ids)
        reference = torch_logits_fn(adapted["models"][name])(ids)
        assert np.max(np.abs(logits - reference)) < 1e-4, name  # each adapter is its PyTorch model
        assert np.max(np.abs(logits - plain)) > 1e-3, name  # and really changes the model
        if name in seen:
            assert np.array_equal(logits, seen[name])  # switching back gives the same model again
        seen[name] = logits
    assert np.max(np.abs(seen["one"] - seen["two"])) > 1e-3
    session.activate(None)
    assert np.array_equal(onnx_logits_fn(session)(ids), plain)
    with pytest.raises(InputError, match="no adapter 'three' is loaded"):
        session.activate("three")


def test_bad_modules_and_mismatched_adapters_name_what_is_wrong(adapted):
    proto = onnx.load(str(adapted["onnx_dir"] / "model.onnx"), load_external_data=False)
    with pytest.raises(
        InputError,
        match=r"module model.layers.0.self_attn.qkv: no MatMul node /model/layers.0/self_attn/qkv/MatMul",
    ):
        ort_lora.add_lora_inputs(proto, ["model.layers.0.self_attn.qkv"])
    slot = adapted["slots"][0]
    wrong = {
        f"{slot.module}.lora_A.default.weight": torch.zeros(4, slot.in_features + 1),
        f"{slot.module}.lora_B.default.weight": torch.zeros(slot.out_features, 4),
    }
    with pytest.raises(InputError, match=f"adapter for {slot.module} has shapes"):
        ort_lora.adapter_tensors(wrong, [slot], 1.0)
    with pytest.raises(InputError, match="has no lora_A"):
        ort_lora.adapter_tensors({}, [slot], 1.0)


def test_node_names_follow_the_exporter_scopes():
    assert ort_lora.node_name("model.layers.12.mlp.down_proj") == "/model/layers.12/mlp/down_proj/MatMul"
    assert ort_lora.node_name("transformer.h.0.attn.c_attn") == "/transformer/h.0/attn/c_attn/MatMul"
