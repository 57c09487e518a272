"""Load and save Hugging Face checkpoints for pruning, keeping the model class and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, StageError


def model_class(folder: Path) -> Any:
    """The transformers class named in config.json `architectures` (AutoModel when absent)."""
    import transformers

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(f"{folder}: no config.json; expected a Hugging Face checkpoint folder")
    try:
        archs = json.loads(config_path.read_text(encoding="utf-8")).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{config_path}: not valid JSON ({err})") from None
    cls = getattr(transformers, archs[0], None) if archs else None
    return cls if cls is not None else transformers.AutoModel


def load_model(folder: str | Path, cls: Any = None) -> Any:
    """Load the checkpoint in `folder` as float32 in eval mode, with its saved head (architectures)."""
    folder = Path(folder)
    cls = cls or model_class(folder)
    try:
        model = cls.from_pretrained(folder)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{folder}: cannot load the checkpoint with {cls.__name__}: {first}") from None
    return model.float().eval()


def save_checkpoint(model: Any, src: Path, dst: Path) -> list[str]:
    """Copy tokenizer and other metadata from `src`, then save_pretrained(safetensors) into `dst`.

    save_pretrained runs last so that the updated config.json (pruned sizes) replaces the copy.
    """
    from pipeline.onnx.io import copy_metadata

    copied = copy_metadata(src, dst)
    # a sharded source's index would shadow the new weights; an upstream stage's report is not ours
    for stale in [*dst.glob("*.index.json"), dst / "report.txt"]:
        if stale.is_file():
            stale.unlink()
            copied = [name for name in copied if name != stale.name]
    model.save_pretrained(dst, safe_serialization=True)
    if not (dst / "model.safetensors").is_file():
        raise StageError(f"{dst}: save_pretrained wrote no model.safetensors")
    return copied


def check_reload(model: Any, folder: Path, *, atol: float = 1e-5, seed: int = 0) -> float:
    """Reload `folder` with the same class and compare outputs on random ids; StageError past atol."""
    import torch

    reloaded = load_model(folder, type(model))
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    model.eval()
    with torch.no_grad():
        expected = _first_tensor(model(input_ids=ids, attention_mask=mask))
        got = _first_tensor(reloaded(input_ids=ids, attention_mask=mask))
    if expected.shape != got.shape:
        raise StageError(
            f"{folder}: reloaded model gives shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        )
    diff = float((expected - got).abs().max())
    if diff > atol:
        raise StageError(
            f"{folder}: reloaded pruned model differs from the pruned model by {diff:.3g} > {atol}"
        )
    return diff


def _first_tensor(output: Any) -> Any:
    if hasattr(output, "logits"):
        return output.logits
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output[0]
