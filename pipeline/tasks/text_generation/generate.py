"""Greedy generation with the KV-cache ONNX model, and its token agreement with PyTorch.

`OnnxGreedyGenerator.generate` runs the prompt once with an empty past, then one token per step with
the previous presents fed back as past: the loop a deployment would run with onnxruntime alone.
`greedy_agreement` compares it with transformers' own `generate(do_sample=False)` on the same prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.tasks.text_generation.io import DecoderIO

PAD = -1  # marks the positions after an EOS in compared sequences
# Prompts per generation call: one left-padded batch of 20 prompts costs about what 3 single
# prompts do, and validation generates for PyTorch and every variant.
GREEDY_BATCH = 32


class OnnxGreedyGenerator:
    """Greedy decoding with an ONNX decoder session (optimum's with-past layout)."""

    def __init__(self, session: Any, label: str = "ONNX decoder") -> None:
        self.session = session
        self.io = DecoderIO.from_session(session, label)

    def generate(
        self,
        input_ids: np.ndarray,
        max_new_tokens: int,
        attention_mask: np.ndarray | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int = 0,
        until_diverging_from: Sequence[Sequence[int]] | None = None,
    ) -> np.ndarray:
        """New token ids [batch, max_new_tokens] after the (left-padded) prompts `input_ids`.

        With `eos_token_id` (one id or several), a row that produced one is padded with
        `pad_token_id` afterwards and the loop stops once every row is done; without it exactly
        max_new_tokens are produced. `until_diverging_from` (one reference continuation per row):
        a row stops after its first token that differs from its reference, the rest padded: an
        agreement check compares nothing after it, and a variant that diverges early then costs a
        few steps, not all.
        """
        ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
        if ids.shape[1] < 1:
            raise InputError("generate: the prompt is empty (need at least one token)")
        if max_new_tokens < 1:
            raise InputError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        mask = (
            np.ones_like(ids)
            if attention_mask is None
            else np.atleast_2d(np.asarray(attention_mask, dtype=np.int64))
        )
        if mask.shape != ids.shape:
            raise InputError(f"generate: attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        batch = ids.shape[0]
        references = None
        if until_diverging_from is not None:
            if len(until_diverging_from) != batch:
                raise InputError(
                    f"generate: until_diverging_from has {len(until_diverging_from)} references for "
                    f"{batch} prompts"
                )
            references = np.asarray([list(r)[:max_new_tokens] for r in until_diverging_from], np.int64)
            if references.shape != (batch, max_new_tokens):
                raise InputError(f"generate: each reference needs {max_new_tokens} tokens")
        past = self.io.empty_past(batch)
        names = list(self.io.output_names)
        logits_index = names.index("logits")
        produced = np.full((batch, max_new_tokens), pad_token_id, dtype=np.int64)
        done = np.zeros(batch, dtype=bool)
        eos = np.asarray(_ids(eos_token_id), dtype=np.int64)
        step_ids = ids
        for step in range(max_new_tokens):
            outputs = self.session.run(names, self.io.feeds(step_ids, mask, past))
            argmax = np.argmax(outputs[logits_index][:, -1, :], axis=-1).astype(np.int64)
            next_ids = np.where(done, pad_token_id, argmax)
            produced[:, step] = next_ids
            if references is not None:
                done |= next_ids != references[:, step]
            if eos.size:
                done |= np.isin(next_ids, eos)
            if done.all():
                break
            past = self.io.past_from_outputs(outputs)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            # A finished row keeps being fed (its output is discarded): its argmax, a valid id.
            step_ids = argmax[:, None]
        return produced


def _ids(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, (int, np.integer)) else [int(v) for v in value]


def eos_ids(model: Any) -> list[int]:
    """The end-of-sequence id(s) generate() stops at (generation config, else model config)."""
    generation = getattr(model, "generation_config", None)
    value = getattr(generation, "eos_token_id", None)
    if value is None:
        value = getattr(model.config, "eos_token_id", None)
    return _ids(value)


def left_padded(prompts: Sequence[Sequence[int]], fill: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [len(prompts), longest]: the prompts left-padded with `fill`."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), fill, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, -len(prompt) :] = prompt
            mask[row, -len(prompt) :] = 1
    return ids, mask


def greedy_batch_size(session: Any) -> int:
    """Prompts per generation call for `session`: GREEDY_BATCH when it takes position_ids (a
    left-padded row then sees exactly the positions it would alone), else 1: a decoder that derives
    positions from the mask (ONNX Runtime GenAI's builder) mis-rotates left-padded rows."""
    return GREEDY_BATCH if DecoderIO.from_session(session).has_position_ids else 1


def _batches(prompts: Sequence[Sequence[int]], size: int) -> list[Sequence[Sequence[int]]]:
    return [prompts[start : start + size] for start in range(0, len(prompts), size)]


def torch_greedy(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad: int = PAD,
    batch_size: int = GREEDY_BATCH,
) -> list[list[int]]:
    """transformers' generate() greedy for each prompt: max_new_tokens ids, `pad` after an EOS.

    `batch_size` left-padded prompts per generate() call (the ONNX loop is compared on the same
    batches, so both see the same padded inputs). A fresh GenerationConfig (greedy, no repetition
    penalty or other processors a hub model's generation_config may carry) so the reference is
    plain argmax decoding, as the ONNX loop is.
    """
    import torch
    from transformers import GenerationConfig

    eos = eos_ids(model)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos or None,
        bos_token_id=getattr(model.config, "bos_token_id", None),
        pad_token_id=eos[0] if eos else 0,
        use_cache=True,
    )
    continuations: list[list[int]] = []
    for group in _batches(prompts, batch_size):
        ids, mask = left_padded(group, fill=eos[0] if eos else 0)
        with torch.no_grad():
            out = model.generate(
                torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), generation_config=config
            )
        for row in out[:, ids.shape[1] :].tolist():
            tokens = row
            for index, token in enumerate(row):
                if token in eos:
                    tokens = row[: index + 1]
                    break
            continuations.append(tokens + [pad] * (max_new_tokens - len(tokens)))
    return continuations


def greedy_agreement(
    model: Any,
    session: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    label: str = "ONNX decoder",
    references: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Greedy tokens of `session` (KV-cache loop) vs PyTorch's generate() on each prompt.

    Both run the prompts in the same left-padded batches of `greedy_batch_size(session)`.
    `references` are PyTorch's continuations (`torch_greedy` of the prompts with that batch size)
    when the caller has them already: a validation of several variants generates them once.

    Both stop at the model's EOS id(s); positions after it count as padding (equal when both
    stopped there). `token_agreement` counts, per prompt, the generated tokens before the first
    divergence (after it the two continue from different contexts, so later positions are not
    comparable) over all generated tokens, so the ONNX loop stops a row at its first divergent
    token (the samples' ONNX tokens end there, padded). `exact_sequences` is the fraction of
    prompts whose continuations are identical.
    """
    if not prompts:
        raise InputError("greedy_agreement: no prompts")
    batch_size = greedy_batch_size(session)
    if references is None:
        references = torch_greedy(model, prompts, max_new_tokens, batch_size=batch_size)
    if len(references) != len(prompts):
        raise InputError(f"greedy_agreement: {len(references)} references for {len(prompts)} prompts")
    generator = OnnxGreedyGenerator(session, label)
    eos = eos_ids(model)
    onnx_rows: list[list[int]] = []
    for group, group_references in zip(
        _batches(prompts, batch_size), _batches(references, batch_size), strict=True
    ):
        ids, mask = left_padded(group, fill=eos[0] if eos else 0)
        onnx_rows += generator.generate(
            ids,
            max_new_tokens,
            attention_mask=mask,
            eos_token_id=eos,
            pad_token_id=PAD,
            until_diverging_from=group_references,
        ).tolist()
    matched, divergences, exact = 0, [], 0
    samples = []
    for prompt, reference, onnx_tokens in zip(prompts, references, onnx_rows, strict=True):
        prefix = next(
            (i for i, (a, b) in enumerate(zip(reference, onnx_tokens, strict=True)) if a != b),
            max_new_tokens,
        )
        matched += prefix
        exact += prefix == max_new_tokens
        divergences.append(None if prefix == max_new_tokens else prefix)
        if len(samples) < 3:
            samples.append({"prompt_tokens": len(prompt), "pytorch": reference, "onnx": onnx_tokens})
    total = len(prompts) * max_new_tokens
    return {
        "prompts": len(prompts),
        "new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "eos_token_ids": eos,
        "token_agreement": matched / total,
        "exact_sequences": exact / len(prompts),
        "first_divergence": divergences,
        "samples": samples,
    }


def prompts_from_texts(
    tokenizer: Any, texts: Sequence[str], count: int, min_len: int = 8, max_len: int = 32, seed: int = 0
) -> list[list[int]]:
    """`count` prompts: the first 8..32 tokens (length drawn with `seed`) of successive texts."""
    rng = np.random.default_rng(seed)
    prompts: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        length = int(rng.integers(min_len, max_len + 1))
        if len(ids) >= min_len:
            prompts.append(list(ids[: min(length, len(ids))]))
        if len(prompts) == count:
            return prompts
    if not prompts:
        raise InputError(f"prompts: none of the {len(texts)} texts has {min_len} tokens")
    return prompts
