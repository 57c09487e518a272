"""Calibration data for static quantization and GPTQ: real examples, tokenised like the model's inputs.

The examples come from the recipe's calibration split (drawn with its seed by the data layer) and
are fed one per batch, unpadded, in that order, so a calibration run is reproducible: the same
examples and seed give the same ranges, hence the same scales and model bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError

_ORT_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


def model_input_specs(model_path: Path) -> dict[str, Any]:
    """{input name: numpy dtype} of the graph inputs (initializers excluded)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    specs = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        elem = value.type.tensor_type.elem_type
        specs[value.name] = onnx.helper.tensor_dtype_to_np_dtype(elem)
    return specs


def encode_texts(
    texts: Sequence[str], tokenizer: Any, input_specs: dict[str, Any], max_length: int
) -> list[dict[str, np.ndarray]]:
    """One feed dict per text (batch 1, no padding), truncated to `max_length` tokens.

    Inputs the tokenizer does not produce are filled the standard way: token_type_ids with zeros,
    position_ids with 0..seq-1; any other model input is an InputError naming it.
    """
    feeds = []
    for text in texts:
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_tensors="np")
        seq = encoded["input_ids"].shape[1]
        feed = {}
        for name, dtype in input_specs.items():
            if name in encoded:
                value = encoded[name]
            elif name == "token_type_ids":
                value = np.zeros((1, seq))
            elif name == "position_ids":
                value = np.arange(seq)[None, :]
            elif name == "attention_mask":
                value = np.ones((1, seq))
            else:
                raise InputError(
                    f"calibration: the model input {name!r} is neither produced by the tokenizer nor "
                    "a standard input (input_ids, attention_mask, token_type_ids, position_ids)"
                )
            feed[name] = np.asarray(value, dtype=dtype)
        feeds.append(feed)
    return feeds


def calibration_feeds(
    examples: Sequence[Any],
    tokenizer_dir: Path,
    model_path: Path,
    max_length: int,
    trust_remote_code: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Tokenised calibration examples (InputError when there are none or all are empty)."""
    from pipeline.tasks.base import load_tokenizer

    if not examples:
        raise InputError(
            "data.calibration: no calibration examples (static quantization and GPTQ need real data)"
        )
    texts = [getattr(example, "text", None) for example in examples]
    texts = [text for text in texts if isinstance(text, str) and text.strip()]
    if not texts:
        raise InputError(
            f"data.calibration: all {len(examples)} calibration examples have empty text "
            "(static quantization and GPTQ need real data)"
        )
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    specs = model_input_specs(model_path)
    if any(name.startswith("past_key_values.") for name in specs):
        return decoder_prompt_feeds(texts, tokenizer, model_path, max_length)
    return encode_texts(texts, tokenizer, specs, max_length)


def decoder_prompt_feeds(
    texts: Sequence[str], tokenizer: Any, model_path: Path, max_length: int
) -> list[dict[str, np.ndarray]]:
    """A KV-cache decoder's prompt step per text (batch 1, no padding, empty past), truncated to
    `max_length` tokens: what GPTQ's Hessians are collected from."""
    from pipeline.onnx.session import open_session
    from pipeline.tasks.text_generation.io import DecoderIO

    io = DecoderIO.from_session(open_session(model_path), label=str(model_path))
    feeds = []
    for text in texts:
        ids = np.asarray(tokenizer(text, truncation=True, max_length=max_length)["input_ids"], np.int64)
        ids = ids[None, :]
        feeds.append(io.feeds(ids, np.ones_like(ids), io.empty_past(1)))
    return feeds


def make_reader(feeds: list[dict[str, np.ndarray]], description: str = "calibration") -> Any:
    """A CalibrationDataReader over `feeds` with a tqdm progress bar; `rewind()` for reuse.

    Supports `set_range` so quantize_static can collect one example at a time
    (extra option CalibStridedMinMax=1): histogram calibrators (Entropy, Percentile) stack the
    collected tensors and need one shape per collection, and examples have different lengths.
    """
    from onnxruntime.quantization import CalibrationDataReader
    from tqdm.auto import tqdm

    class FeedReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.start, self.end = 0, len(feeds)
            self.index = 0
            self.bar: Any = None

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.index >= self.end:
                return None
            if self.bar is None:
                self.bar = tqdm(total=len(feeds), desc=description, unit="ex", leave=False)
            feed = feeds[self.index]
            self.index += 1
            self.bar.update(1)
            if self.index >= len(feeds):
                self.bar.close()
            return feed

        def rewind(self) -> None:
            if self.bar is not None:
                self.bar.close()
            self.start, self.end, self.index, self.bar = 0, len(feeds), 0, None

        def __len__(self) -> int:
            return len(feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.start, self.end = start_index, min(end_index, len(feeds))
            self.index = self.start

    return FeedReader()
