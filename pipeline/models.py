"""Load a Hugging Face checkpoint as the PyTorch model for a task (the reference for parity)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import InputError

# Recipe task -> (transformers Auto class, optimum export task).
TASKS: dict[str, tuple[str, str]] = {
    "token-classification": ("AutoModelForTokenClassification", "token-classification"),
    "text-classification": ("AutoModelForSequenceClassification", "text-classification"),
    "feature-extraction": ("AutoModel", "feature-extraction"),
    "question-answering": ("AutoModelForQuestionAnswering", "question-answering"),
    "text-generation": ("AutoModelForCausalLM", "text-generation"),
}


def load_torch_model(folder: Path, task: str, trust_remote_code: bool = False) -> Any:
    """The model in `folder` with the head for `task`, in eval mode, weights from safetensors."""
    import transformers

    if task not in TASKS:
        raise InputError(f"model.task: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    auto_class = getattr(transformers, TASKS[task][0])
    if not (Path(folder) / "config.json").is_file():
        raise InputError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        model = auto_class.from_pretrained(
            str(folder), use_safetensors=_has_safetensors(folder), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{folder}: cannot load the model for {task}: {first}") from None
    return model.eval()


def _has_safetensors(folder: Path) -> bool:
    # Prefer safetensors; a folder with only pickled weights loads through transformers' own
    # weights_only torch.load (no arbitrary pickle execution).
    return any(Path(folder).glob("*.safetensors"))


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved beside the model; InputError when the folder has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{folder}: no usable tokenizer ({first})") from None
