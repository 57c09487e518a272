"""genai_config.json for a KV-cache decoder exported by this pipeline (optimum's layout), so that
onnxruntime-genai, the runtime deployers use for ONNX LLMs, runs the release bundle as it is.

onnxruntime-genai drives the model step by step itself; what it needs to know is the I/O naming
(input_ids, attention_mask, position_ids, past_key_values.%d.key/value -> present.%d.key/value)
and the shapes. optimum's graph returns a present that is the past plus the new tokens, not a
preallocated buffer, so `past_present_share_buffer` is false.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILE = "genai_config.json"
# model.type picks onnxruntime-genai's runner class. Its "gpt2" runner expects the legacy combined
# past tensors (past_%d); an optimum GPT-2 export has separate key/value tensors, which is the
# generic decoder-only runner's layout (measured with 0.15.2: "gpt2" fails with "Model input was
# not found", "llama" generates).
GENAI_TYPE = {"gpt2": "llama"}


def genai_config(folder: Path) -> dict[str, Any]:
    """The config for `folder` (model.onnx + config.json + generation_config.json)."""
    from pipeline.onnx.io import read_config

    config = read_config(folder)
    generation = {}
    if (Path(folder) / "generation_config.json").is_file():
        generation = json.loads((Path(folder) / "generation_config.json").read_text(encoding="utf-8"))

    def pick(*names: str, default: Any = None) -> Any:
        return next((config[n] for n in names if config.get(n) is not None), default)

    heads = pick("num_attention_heads", "n_head")
    hidden = pick("hidden_size", "n_embd")
    layers = pick("num_hidden_layers", "n_layer")
    context = pick("max_position_embeddings", "n_positions", default=2048)
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    import onnx

    graph_inputs = {
        i.name for i in onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False).graph.input
    }
    if "position_ids" in graph_inputs:
        inputs["position_ids"] = "position_ids"
    inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    return {
        "model": {
            "bos_token_id": pick("bos_token_id", default=eos),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": pick("head_dim", default=hidden // heads),
                "hidden_size": hidden,
                "inputs": inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": pick("num_key_value_heads", default=heads),
            },
            "eos_token_id": eos,
            "pad_token_id": pick("pad_token_id", default=eos if not isinstance(eos, list) else eos[0]),
            "type": GENAI_TYPE.get(config.get("model_type"), config.get("model_type")),
            "vocab_size": config.get("vocab_size"),
        },
        "search": {
            "do_sample": False,
            "early_stopping": True,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path) -> Path:
    path = Path(folder) / FILE
    path.write_text(json.dumps(genai_config(folder), indent=2) + "\n", encoding="utf-8")
    return path
