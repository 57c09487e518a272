"""Fine-tune stage and train_model on tiny models and trivially learnable tasks."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from helpers import make_ner_examples, make_text_examples, write_conll

from pipeline.config import FinetuneConfig, recipe_from_dict
from pipeline.data import DataBundle
from pipeline.errors import InputError, RecipeError
from pipeline.stages.registry import StageContext, get_stage
from pipeline.tasks import get_task, id2label_of, load_tokenizer
from pipeline.training import train_model

torch = pytest.importorskip("torch")

FAST = dict(epochs=3, lr=3e-3, batch_size=16, warmup_ratio=0.1, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _score(task, model, tokenizer, examples):
    encoded = task.encode(tokenizer, examples, 32)
    predictions = task.run(task.torch_forward(model), encoded, 32, id2label_of(model.config))
    return task.score(predictions, examples)[task.metric_name]


def _train_ner(bare_dir, seed=0, **overrides):
    task = get_task("token-classification")
    torch.manual_seed(seed)
    model = task.load_model(bare_dir, labels=["B-LOC", "B-PER", "O"])
    tokenizer = load_tokenizer(bare_dir)
    train, evaluation = make_ner_examples(160, seed=1), make_ner_examples(40, seed=2)
    before = _score(task, model, tokenizer, evaluation)
    config = FinetuneConfig(**{**FAST, "seed": seed, **overrides})
    return (
        before,
        train_model(model, tokenizer, task, train, evaluation, config, 32),
        task,
        tokenizer,
        evaluation,
    )


def test_finetune_config_fields_documented_and_strict():
    for name, info in FinetuneConfig.model_fields.items():
        assert info.description, name
    with pytest.raises(ValueError):
        FinetuneConfig(epochs=1, learning_rate=1e-4)
    assert FinetuneConfig().max_length is None


def test_ner_metric_rises_and_best_epoch_is_kept(bare_dir):
    before, result, task, tokenizer, evaluation = _train_ner(bare_dir)
    assert before < 0.5
    assert result.best_metric > 0.9 and result.best_metric > before
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.best_metric == max(h["f1"] for h in result.history)
    assert result.history[result.best_epoch - 1]["f1"] == result.best_metric
    # the returned model holds the best epoch's weights
    assert _score(task, result.model, tokenizer, evaluation) == pytest.approx(result.best_metric)
    assert "LOC" in result.report and "PER" in result.report
    metrics = result.metrics()
    assert set(metrics) >= {"best_epoch", "best_metric", "metric_name", "history", "seconds_per_epoch"}
    json.dumps(metrics)


def test_same_seed_same_result_other_seed_differs(bare_dir):
    _, first, *_ = _train_ner(bare_dir, epochs=1, lr=1e-3)
    _, second, *_ = _train_ner(bare_dir, epochs=1, lr=1e-3)
    _, third, *_ = _train_ner(bare_dir, seed=1, epochs=1, lr=1e-3)
    strip = [{k: v for k, v in h.items() if "seconds" not in k} for h in first.history]
    assert strip == [{k: v for k, v in h.items() if "seconds" not in k} for h in second.history]
    assert first.history[0]["train_loss"] != third.history[0]["train_loss"]


def test_text_classification_with_distillation(bare_dir):
    task = get_task("text-classification")
    tokenizer = load_tokenizer(bare_dir)
    train, evaluation = make_text_examples(128, seed=1), make_text_examples(32, seed=2)
    torch.manual_seed(0)
    teacher = task.load_model(bare_dir, labels=["neg", "pos"])
    config = FinetuneConfig(**{**FAST, "lr": 5e-3, "batch_size": 8})
    teacher = train_model(teacher, tokenizer, task, train, evaluation, config, 32).model
    torch.manual_seed(1)
    student = task.load_model(bare_dir, labels=["neg", "pos"])
    result = train_model(
        student, tokenizer, task, train, evaluation, config, 32, teacher=teacher, distill_alpha=0.7
    )
    assert result.best_metric >= 0.9
    assert all(h["train_loss"] == h["train_loss"] for h in result.history)  # finite, not NaN
    with pytest.raises(InputError, match="distill_alpha"):
        train_model(student, tokenizer, task, train, evaluation, config, 32, teacher=teacher, distill_alpha=2)


def _context(tmp_path, bare_dir, task, train_file, **finetune):
    document = {
        "name": "tiny",
        "model": {"source": str(bare_dir), "task": task, "max_length": 32},
        "data": {
            "train": {"source": str(train_file), "split": "0:80%"},
            "eval": {"source": str(train_file), "split": "80%:"},
        },
        "finetune": {**FAST, **finetune},
    }
    recipe = recipe_from_dict(document)
    out = tmp_path / "out"
    out.mkdir()
    return StageContext(
        config=recipe.finetune,
        model=recipe.model,
        task=get_task(task),
        input_dir=bare_dir,
        output_dir=out,
        data=DataBundle.from_recipe(recipe).view(("train", "eval")),
        log=logging.getLogger("test"),
    )


def test_finetune_stage_writes_a_checkpoint(tmp_path, bare_dir, capsys):
    train_file = write_conll(tmp_path / "ner.txt", make_ner_examples(200, seed=3), blank="\t")
    ctx = _context(tmp_path, bare_dir, "token-classification", train_file, max_eval_examples=30)
    metrics = get_stage("finetune").fn(ctx)
    assert metrics["metric_name"] == "f1" and metrics["best_metric"] > 0.9
    assert metrics["train_examples"] == 160 and metrics["eval_examples"] == 30
    files = {p.name for p in ctx.output_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt", "report.txt"} <= files
    config = json.loads((ctx.output_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "B-LOC", "1": "B-PER", "2": "O"}
    assert config["architectures"] == ["BertForTokenClassification"]
    report = (ctx.output_dir / "report.txt").read_text()
    assert report.startswith(f"best epoch {metrics['best_epoch']}/3") and "micro avg" in report
    assert "micro avg" in capsys.readouterr().out
    # the checkpoint reloads with its head and scores what the stage said
    task = get_task("token-classification")
    model = task.load_model(ctx.output_dir)
    evaluation = ctx.data.get("eval")[:30]
    assert _score(task, model, load_tokenizer(ctx.output_dir), evaluation) == pytest.approx(
        metrics["best_metric"]
    )


def test_finetune_stage_rejects_embeddings(tmp_path, bare_dir):
    data = tmp_path / "t.jsonl"
    data.write_text(
        "".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in make_text_examples(10))
    )
    with pytest.raises(RecipeError, match="a feature-extraction model cannot be fine-tuned"):
        _context(tmp_path, bare_dir, "feature-extraction", data)


def test_group_by_length_batches_cover_the_epoch_with_less_padding():
    import torch

    from pipeline.tasks.base import Encoded
    from pipeline.training.loop import _epoch_order

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 64, size=1000)
    encoded = Encoded(features={"input_ids": [[1] * int(n) for n in lengths]})

    def epoch(grouped: bool, seed: int = 0) -> list[list[int]]:
        config = FinetuneConfig(batch_size=16, group_by_length=grouped)
        return _epoch_order(encoded, config, torch.Generator().manual_seed(seed))

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    grouped, plain = epoch(True), epoch(False)
    for batches in (grouped, plain):
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert len(batches) == 63 and all(len(b) <= 16 for b in batches)
    assert padded(grouped) < 0.75 * padded(plain)
    assert epoch(True) == grouped and epoch(True, seed=1) != grouped  # seeded, still shuffled
