"""The prune stage end to end on tiny checkpoints: config validation, outputs, metrics, recovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import prune_ner_examples, pruning_model
from pydantic import ValidationError

from pipeline.config import PruneConfig, recipe_from_dict
from pipeline.errors import InputError, RecipeError

torch = pytest.importorskip("torch")


def _recipe(model_dir: Path, steps: list | None = None, **extra):
    document = {
        "name": "tiny-prune",
        "model": {"source": str(model_dir), "task": "token-classification", "max_length": 32},
        "data": {"train": {"source": "train.conll"}, "eval": {"source": "eval.conll"}},
        "variants": {"pruned": steps or []},
    }
    document.update(extra)
    return recipe_from_dict(document, source="recipe.yaml")


def _run(model_dir: Path, out: Path, reference: Path | None = None, **config):
    from pipeline.config import FinetuneConfig
    from pipeline.data import DataBundle
    from pipeline.stages.registry import get_stage, run_stage

    spec = get_stage("prune")
    assert (spec.consumes, spec.produces) == ("hf", "hf")
    pruning = PruneConfig.model_validate(config)
    assert spec.splits(pruning) == (("train", "tune", "eval") if pruning.recover_epochs else ())
    metrics = run_stage(
        "prune",
        pruning,
        model_dir,
        out,
        model={"source": str(model_dir), "task": "token-classification", "max_length": 32},
        data=DataBundle.from_examples(
            "token-classification", train=prune_ner_examples(48, seed=1), eval=prune_ner_examples(16, seed=2)
        ),
        sections={"finetune": FinetuneConfig(batch_size=8, lr=1e-3, seed=0)},
        reference_hf_dir=reference,
    )
    json.dumps(metrics)  # JSON-serialisable
    return metrics


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return pruning_model(tmp_path_factory.mktemp("prune_stage") / "model")


# ------------------------------------------------------------------------------------------ config


def test_config_defaults_and_descriptions():
    config = PruneConfig(kind="ffn")
    assert config.amount == 0.5 and config.recover_epochs == 0 and not config.distill
    assert PruneConfig(kind="heads", heads_per_layer=2).amount is None
    for name, field in PruneConfig.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"kind": "ffn", "amount": 1.5}, "amount: expected a value < 1"),
        ({"kind": "ffn", "amount": 0}, "amount: expected a value > 0"),
        ({"kind": "channels"}, "kind: expected 'unstructured', 'ffn' or 'heads'"),
        ({"kind": "heads", "amount": 0.5, "heads_per_layer": 2}, "either amount or heads_per_layer"),
        ({"kind": "ffn", "heads_per_layer": 2}, "heads_per_layer applies to kind heads only"),
        ({"kind": "ffn", "targets": ["ffn"]}, "targets applies to kind unstructured only"),
        ({"kind": "heads", "scope": "layer"}, "scope applies to kind unstructured only"),
        ({"kind": "unstructured", "schedule": "iterative"}, "schedule: unknown key"),
        ({"kind": "ffn", "distill": True}, "distill / recover_lr / recover_method need recover_epochs >= 1"),
        ({"kind": "ffn", "amout": 0.3}, "amout: unknown key"),
    ],
)
def test_bad_config_is_a_one_line_recipe_error(model_dir, raw, message):
    with pytest.raises(RecipeError) as err:
        _recipe(model_dir, [{"prune": raw}])
    text = str(err.value)
    assert text.startswith("recipe.yaml: variants.pruned.0.prune")
    assert message in text
    assert "\n" not in text


def test_config_errors_are_validation_errors():
    with pytest.raises(ValidationError):
        PruneConfig(kind="unstructured", amount=1.0)


# ------------------------------------------------------------------------------------------- stage


def test_unstructured_stage_writes_checkpoint_and_honest_metrics(model_dir, tmp_path):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    metrics = _run(model_dir, tmp_path / "out", kind="unstructured", amount=0.6)
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "vocab.txt").is_file()
    AutoTokenizer.from_pretrained(out)
    model = AutoModelForTokenClassification.from_pretrained(out)
    assert metrics["zero_weights"] == round(0.6 * metrics["target_weights"])
    assert metrics["sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert len(metrics["sparsity_per_layer"]) == 12
    assert "no speed-up" in metrics["ort_note"]
    assert metrics["params_after"] == metrics["params_before"]  # zeros are still parameters
    assert metrics["safetensors_gzip_bytes"] < 0.8 * metrics["input_safetensors_gzip_bytes"]
    assert metrics["reload_max_abs_diff"] == 0.0
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if "encoder" in n and "weight" in n)
    assert zeros >= metrics["zero_weights"]


def test_ffn_stage_shrinks_and_reloads(model_dir, tmp_path):
    import shutil

    from transformers import AutoConfig

    upstream = shutil.copytree(model_dir, tmp_path / "finetuned")
    (upstream / "report.txt").write_text("the fine-tune stage's report")
    metrics = _run(upstream, tmp_path / "out", kind="ffn", amount=0.25)
    assert not (tmp_path / "out" / "report.txt").exists()  # not carried into the pruned checkpoint
    assert metrics["intermediate_before"] == 40 and metrics["intermediate_after"] == 30
    assert metrics["params_before"] - metrics["params_after"] == 2 * 10 * (32 + 1 + 32)
    assert AutoConfig.from_pretrained(tmp_path / "out").intermediate_size == 30
    assert "metric_recovered" not in metrics


def test_heads_stage_records_pruned_heads(model_dir, tmp_path):
    from transformers import AutoConfig

    metrics = _run(model_dir, tmp_path / "out", kind="heads", heads_per_layer=3)
    assert (metrics["heads_before"], metrics["heads_after"], metrics["attention_hidden_size"]) == (4, 1, 8)
    pruned = AutoConfig.from_pretrained(tmp_path / "out").pruned_heads
    assert {k: len(v) for k, v in pruned.items()} == {0: 3, 1: 3}
    assert metrics["pruned_heads"] == {str(k): sorted(v) for k, v in pruned.items()}


def test_stage_refuses_unsupported_model_and_writes_nothing(tmp_path):
    gpt2 = pruning_model(tmp_path / "gpt2", "gpt2", head="token")
    with pytest.raises(InputError, match="model_type 'gpt2'"):
        _run(gpt2, tmp_path / "out", kind="ffn")
    assert list((tmp_path / "out").iterdir()) == []


def test_stage_refuses_too_many_heads(model_dir, tmp_path):
    with pytest.raises(InputError, match="heads_per_layer=4 drops 4 heads per layer; expected 1..3"):
        _run(model_dir, tmp_path / "out", kind="heads", heads_per_layer=4)


# ---------------------------------------------------------------------------------------- recovery


def test_recovery_keeps_unstructured_zeros(model_dir, tmp_path):
    metrics = _run(model_dir, tmp_path / "out", kind="unstructured", amount=0.5, recover_epochs=1)
    assert metrics["zero_weights"] == round(0.5 * metrics["target_weights"])
    assert metrics["metric_name"] == "f1"
    for key in ("metric_dense", "metric_pruned", "metric_recovered"):
        assert 0.0 <= metrics[key] <= 1.0
    history = metrics["recover_history"]
    assert len(history) == 1 and metrics["recover_best_epoch"] == 1
    # the saved model is the recovered one: it scores what the training loop measured
    assert history[0]["f1"] == pytest.approx(metrics["metric_recovered"], abs=1e-6)


def test_recovery_with_distillation_on_heads(model_dir, tmp_path):
    from transformers import AutoConfig

    metrics = _run(
        model_dir,
        tmp_path / "out",
        reference=model_dir,
        kind="heads",
        amount=0.5,
        recover_epochs=1,
        distill=True,
        temperature=2.0,
        alpha=0.7,
    )
    assert metrics["heads_after"] == 2 and metrics["distill"] is True
    assert metrics["params_after"] < metrics["params_before"]
    # the recovered weights keep the pruned shapes and reload as a normal checkpoint
    assert {k: len(v) for k, v in AutoConfig.from_pretrained(tmp_path / "out").pruned_heads.items()} == {
        0: 2,
        1: 2,
    }


def test_lora_recovery_of_a_structured_prune_saves_a_plain_pruned_model(model_dir, tmp_path):
    from transformers import AutoConfig

    metrics = _run(
        model_dir, tmp_path / "out", kind="ffn", amount=0.5, recover_epochs=1, recover_method="lora"
    )
    assert metrics["recover_method"] == "lora"
    assert metrics["recover_trainable_parameters"] < 0.5 * metrics["params_after"]
    assert metrics["recover_merge_max_abs_diff"] < 1e-3
    assert metrics["recover_history"][0]["f1"] == pytest.approx(metrics["metric_recovered"], abs=1e-6)
    assert metrics["reload_max_abs_diff"] == 0.0
    assert (
        AutoConfig.from_pretrained(tmp_path / "out").intermediate_size
        < AutoConfig.from_pretrained(model_dir).intermediate_size
    )


def test_unstructured_recovery_never_uses_lora(model_dir, tmp_path):
    from pipeline.config import FinetuneConfig
    from pipeline.data import DataBundle
    from pipeline.stages.registry import run_stage

    metrics = run_stage(
        "prune",
        PruneConfig(kind="unstructured", amount=0.5, recover_epochs=1),
        model_dir,
        tmp_path / "out",
        model={"source": str(model_dir), "task": "token-classification", "max_length": 32},
        data=DataBundle.from_examples(
            "token-classification", train=prune_ner_examples(48, seed=1), eval=prune_ner_examples(16, seed=2)
        ),
        sections={"finetune": FinetuneConfig(method="lora", batch_size=8, seed=0)},
    )
    assert metrics["recover_method"] == "full"  # a merged adapter would refill the zeros
    assert metrics["zero_weights"] == round(0.5 * metrics["target_weights"])


def test_distillation_needs_a_reference(model_dir, tmp_path):
    with pytest.raises(InputError, match="no reference"):
        _run(model_dir, tmp_path / "out", kind="ffn", recover_epochs=1, distill=True)
