"""Fine-tune stage: train a task head on an encoder (pipeline.training does the training).

The stage reads the recipe's train split, adds a head for the data's labels when the checkpoint
has none, trains (the best epoch is kept: scored on the tune split when the recipe has one, else on
eval, which the report then says), and writes a normal Hugging Face
checkpoint (safetensors + tokenizer) plus `report.txt` (per-label report of the best epoch). With
`method: lora` the adapters are merged before saving, so the checkpoint is a plain model.
"""

from __future__ import annotations

from typing import Any

from pipeline.bench.memory import PeakRSS
from pipeline.config.finetune import FinetuneConfig
from pipeline.stages.registry import StageContext, stage


@stage("finetune", config=FinetuneConfig, consumes="hf", produces="hf", data_splits=("train", "tune", "eval"))
def finetune(ctx: StageContext) -> dict[str, Any]:
    """Fine-tune the model on the recipe's train split, keep the best epoch on tune (else eval)."""
    import torch

    from pipeline.tasks import load_tokenizer
    from pipeline.training import train_model

    config: FinetuneConfig = ctx.config
    task = ctx.task
    train = list(ctx.data.get("train"))[: config.max_train_examples]
    selection = ctx.data.selection_split()
    evaluation = list(ctx.data.get(selection))[: config.max_eval_examples] if ctx.data.has(selection) else []
    labels = ctx.data.labels()
    max_length = config.max_length or ctx.model.max_length

    torch.manual_seed(config.seed)  # the new head's initialisation
    model = task.load_model(ctx.input_dir, labels=labels, trust_remote_code=ctx.model.trust_remote_code)
    tokenizer = load_tokenizer(ctx.input_dir, ctx.model.trust_remote_code)
    ctx.log.info(
        "finetune: %s on %d train examples, best epoch on %d %s examples, %d labels, max_length %d",
        task.name,
        len(train),
        len(evaluation),
        selection,
        len(labels),
        max_length,
    )
    with PeakRSS() as memory:  # what training adds: weights' gradients and optimizer state, activations
        result = train_model(model, tokenizer, task, train, evaluation, config, max_length, log=ctx.log)

    result.model.save_pretrained(str(ctx.output_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(ctx.output_dir))
    header = (
        f"best epoch {result.best_epoch}/{config.epochs}: {result.metric_name} = "
        f"{result.best_metric if result.best_metric is None else round(result.best_metric, 4)}\n"
    )
    report = header + ("\n" + result.report if result.report else "")
    (ctx.output_dir / "report.txt").write_text(report, encoding="utf-8")
    print(report, flush=True)
    return {**result.metrics(), "selected_on": selection, "training_peak_rss_delta_bytes": memory.delta_bytes}
