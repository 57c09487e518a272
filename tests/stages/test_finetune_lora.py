"""finetune.method lora: adapters train, the head trains in full, the merge yields a plain model."""

from __future__ import annotations

import json
import logging

import pytest
from helpers import make_ner_examples, write_conll

from pipeline.config import FinetuneConfig, PruneConfig, recipe_from_dict
from pipeline.data import DataBundle
from pipeline.errors import InputError, RecipeError
from pipeline.stages.registry import StageContext, get_stage
from pipeline.tasks import get_task, id2label_of, load_tokenizer
from pipeline.training import train_model

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

LABELS = ["B-LOC", "B-PER", "O"]
LORA = dict(method="lora", epochs=3, lr=1e-2, batch_size=16, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _f1(task, model, tokenizer, examples):
    encoded = task.encode(tokenizer, examples, 32)
    predictions = task.run(task.torch_forward(model), encoded, 32, id2label_of(model.config))
    return task.score(predictions, examples)["f1"]


def _train(bare_dir, **overrides):
    task = get_task("token-classification")
    torch.manual_seed(0)
    model = task.load_model(bare_dir, labels=LABELS)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = load_tokenizer(bare_dir)
    evaluation = make_ner_examples(40, seed=2)
    before = _f1(task, model, tokenizer, evaluation)
    config = FinetuneConfig(**{**LORA, **overrides})
    result = train_model(model, tokenizer, task, make_ner_examples(160, seed=1), evaluation, config, 32)
    return before, original, result, _f1(task, result.model, tokenizer, evaluation)


def test_lora_trains_adapters_and_head_then_merges_into_a_plain_model(bare_dir):
    before, original, result, after = _train(bare_dir)
    metrics = result.metrics()
    assert metrics["method"] == "lora" and metrics["lr"] == 1e-2
    lora = metrics["lora"]
    assert lora["head"] == ["classifier"]
    assert lora["adapted"] == [
        "attention.output.dense",
        "attention.self.key",
        "attention.self.query",
        "attention.self.value",
        "intermediate.dense",
        "output.dense",
    ]
    # 2 layers x 6 adapters of rank 8, plus the head; nothing else trains
    adapters = sum(
        8 * (w.shape[0] + w.shape[1])
        for k, w in original.items()
        if k.endswith("weight") and w.ndim == 2 and k.startswith("bert.encoder")
    )
    head = original["classifier.weight"].numel() + original["classifier.bias"].numel()
    assert metrics["trainable_parameters"] == adapters + head
    assert metrics["total_parameters"] == sum(v.numel() for v in original.values())
    # merged: a plain transformers model with the original parameter names and shapes
    model = result.model
    assert type(model).__name__ == "BertForTokenClassification"
    state = model.state_dict()
    assert set(state) == set(original)
    assert metrics["merge_max_abs_diff"] < 1e-4
    # frozen weights are untouched; adapted weights moved by the merge; the head was trained
    assert torch.equal(
        state["bert.embeddings.word_embeddings.weight"], original["bert.embeddings.word_embeddings.weight"]
    )
    assert torch.equal(
        state["bert.encoder.layer.0.output.LayerNorm.weight"],
        original["bert.encoder.layer.0.output.LayerNorm.weight"],
    )
    assert not torch.equal(
        state["bert.encoder.layer.0.attention.self.query.weight"],
        original["bert.encoder.layer.0.attention.self.query.weight"],
    )
    assert not torch.equal(state["classifier.weight"], original["classifier.weight"])
    # it learned, and the merged model scores what training measured for its best epoch
    assert after == pytest.approx(result.best_metric)
    assert result.best_metric > before + 0.3


def test_lora_target_modules_choose_the_adapted_layers(bare_dir):
    _, original, result, _ = _train(bare_dir, epochs=1, lora={"target_modules": ["query", "value"], "r": 2})
    assert result.metrics()["lora"]["adapted"] == ["attention.self.query", "attention.self.value"]
    state = result.model.state_dict()
    key = "bert.encoder.layer.1.attention.self.key.weight"
    assert torch.equal(state[key], original[key])


def test_lora_unknown_target_modules_name_the_field_and_the_layers(bare_dir):
    with pytest.raises(
        InputError, match=r"finetune.lora.target_modules: \['qkv'\] match no linear layer.*query"
    ):
        _train(bare_dir, epochs=1, lora={"target_modules": ["qkv"]})


def test_lora_config_defaults_and_errors():
    assert FinetuneConfig().learning_rate == 5e-5
    assert FinetuneConfig(method="lora").learning_rate == 5e-4
    assert FinetuneConfig(method="lora", lr=1e-3).learning_rate == 1e-3
    for name, info in FinetuneConfig.model_fields["lora"].annotation.model_fields.items():
        assert info.description, name
    with pytest.raises(ValueError, match="set method: lora"):
        FinetuneConfig(lora={"r": 4})
    with pytest.raises(ValueError, match="refills the zeros"):
        PruneConfig(kind="unstructured", recover_epochs=1, recover_method="lora")
    with pytest.raises(ValueError, match="need recover_epochs"):
        PruneConfig(kind="ffn", recover_method="lora")


def test_recipe_rejects_bad_lora_fields_with_their_path():
    document = {
        "name": "t",
        "model": {"source": "x", "task": "token-classification"},
        "data": {"train": {"source": "t.txt"}, "eval": {"source": "e.txt"}},
        "finetune": {"method": "lora", "lora": {"r": 0}},
        "variants": {"fp32": []},
    }
    with pytest.raises(RecipeError, match=r"finetune\.lora\.r"):
        recipe_from_dict(document)


def test_finetune_stage_saves_the_merged_checkpoint_and_its_memory(tmp_path, bare_dir):
    from safetensors import safe_open

    train_file = write_conll(tmp_path / "ner.txt", make_ner_examples(200, seed=3), blank="\t")
    recipe = recipe_from_dict(
        {
            "name": "tiny-lora",
            "model": {"source": str(bare_dir), "task": "token-classification", "max_length": 32},
            "data": {
                "train": {"source": str(train_file), "split": "0:80%"},
                "eval": {"source": str(train_file), "split": "80%:"},
            },
            "finetune": LORA,
            "variants": {"fp32": []},
        }
    )
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(
        config=recipe.finetune,
        model=recipe.model,
        task=get_task("token-classification"),
        input_dir=bare_dir,
        output_dir=out,
        data=DataBundle.from_recipe(recipe).view(("train", "eval")),
        log=logging.getLogger("test"),
    )
    metrics = get_stage("finetune").fn(ctx)
    json.dumps(metrics)
    assert metrics["method"] == "lora" and metrics["training_peak_rss_delta_bytes"] >= 0
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and not [k for k in keys if "lora" in k or "modules_to_save" in k]
    model = get_task("token-classification").load_model(out)
    assert _f1(
        get_task("token-classification"), model, load_tokenizer(out), ctx.data.get("eval")
    ) == pytest.approx(metrics["best_metric"])
