"""Pruning algorithms on tiny models: exact sparsity, exact surgery, reload round trips, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import pruning_model

torch = pytest.importorskip("torch")

from pipeline.errors import InputError  # noqa: E402
from pipeline.pruning.checkpoint import check_reload, load_model, save_checkpoint  # noqa: E402
from pipeline.pruning.metrics import count_parameters, gzip_bytes  # noqa: E402
from pipeline.pruning.structured import (  # noqa: E402
    attention_shape,
    ffn_neurons_to_drop,
    heads_to_drop,
    prune_ffn,
    prune_heads,
)
from pipeline.pruning.unstructured import (  # noqa: E402
    apply_magnitude_masks,
    make_permanent,
    select_linears,
    sparsity_report,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_ckpt")
    return {kind: pruning_model(root / kind, kind) for kind in ("bert", "roberta", "distilbert")} | {
        "gpt2": pruning_model(root / "gpt2", "gpt2", head="lm")
    }


def _inputs(vocab: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 13), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ------------------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("amount", [0.3, 0.75])
def test_unstructured_reaches_exact_sparsity(checkpoints, scope, amount):
    model = load_model(checkpoints["bert"])
    modules = apply_magnitude_masks(model, amount, scope=scope)
    make_permanent(modules.values())
    assert not any(hasattr(m, "weight_orig") for m in modules.values())  # masks are baked in
    report = sparsity_report(modules)
    total = sum(m.weight.numel() for m in modules.values())
    assert report["target_weights"] == total
    if scope == "global":
        assert report["zero_weights"] == round(amount * total)
    else:
        assert report["zero_weights"] == sum(round(amount * m.weight.numel()) for m in modules.values())
    assert len(report["per_layer"]) == 2 * 6  # 2 blocks x (Q, K, V, O, up, down)
    if scope == "layer":
        for name, module in modules.items():
            zeros = int((module.weight == 0).sum())
            assert zeros == round(amount * module.weight.numel()), name
    else:  # global: layers differ, total is exact
        assert len(set(report["per_layer"].values())) > 1


def test_unstructured_global_removes_the_smallest_weights(checkpoints):
    model = load_model(checkpoints["bert"])
    before = {n: m.weight.detach().abs().clone() for n, m in select_linears(model).items()}
    modules = apply_magnitude_masks(model, 0.5)
    make_permanent(modules.values())
    kept = torch.cat([before[n][m.weight != 0] for n, m in modules.items()])
    dropped = torch.cat([before[n][m.weight == 0] for n, m in modules.items()])
    assert dropped.max() <= kept.min()


def test_unstructured_targets_only_the_chosen_layers(checkpoints):
    model = load_model(checkpoints["bert"])
    modules = apply_magnitude_masks(model, 0.5, targets=["ffn"])
    make_permanent(modules.values())
    assert set(modules) == {
        f"bert.encoder.layer.{i}.{part}.dense" for i in range(2) for part in ("intermediate", "output")
    }
    for name, module in select_linears(model, ["attention"]).items():
        assert int((module.weight == 0).sum()) == 0, name
    # embeddings and the classifier are never touched
    assert int((model.classifier.weight == 0).sum()) == 0


def test_unstructured_steps_continue_from_earlier_zeros(checkpoints):
    model = load_model(checkpoints["bert"])
    first = apply_magnitude_masks(model, 0.2)
    make_permanent(first.values())
    zero_before = {n: (m.weight == 0).clone() for n, m in first.items()}
    second = apply_magnitude_masks(model, 0.6)
    make_permanent(second.values())
    for name, module in second.items():
        assert bool((module.weight[zero_before[name]] == 0).all()), name
    total = sum(m.weight.numel() for m in second.values())
    assert sparsity_report(second)["zero_weights"] == round(0.6 * total)


def test_unstructured_decoder_gpt2(checkpoints):
    model = load_model(checkpoints["gpt2"])
    modules = apply_magnitude_masks(model, 0.4, scope="layer")
    make_permanent(modules.values())
    assert sorted(modules)[0] == "transformer.h.0.attn.c_attn"
    for module in modules.values():
        assert int((module.weight == 0).sum()) == round(0.4 * module.weight.numel())


def test_unstructured_checkpoint_reloads_and_gzips_smaller(checkpoints, tmp_path):
    model = load_model(checkpoints["bert"])
    modules = apply_magnitude_masks(model, 0.6)
    make_permanent(modules.values())
    save_checkpoint(model, checkpoints["bert"], tmp_path)
    assert check_reload(model, tmp_path) == 0.0
    dense = checkpoints["bert"] / "model.safetensors"
    pruned = tmp_path / "model.safetensors"
    # zeros stay dense: same file size (within header bytes), smaller gzip
    assert abs(pruned.stat().st_size - dense.stat().st_size) < 512
    assert gzip_bytes(pruned) < 0.8 * gzip_bytes(dense)


# -------------------------------------------------------------------------------------------- FFN


def _kill_ffn_neurons(model, dead: list[int]) -> None:
    """Neurons with zero input weights and bias output GELU(0) = 0: removing them changes nothing."""
    from pipeline.pruning.arch import blocks

    with torch.no_grad():
        for block in blocks(model, structured=True):
            block.up.weight[dead] = 0.0
            block.up.bias[dead] = 0.0


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_ffn_pruning_removes_the_weakest_neurons_exactly(checkpoints, model_type):
    model = load_model(checkpoints[model_type])
    dead = [0, 3, 7, 11, 19, 23, 31, 39, 2, 5]
    _kill_ffn_neurons(model, dead)
    inputs = _inputs(model.config.vocab_size)
    expected = _logits(model, inputs)
    params = count_parameters(model)
    result = prune_ffn(model, len(dead))
    assert result == {"intermediate_before": 40, "intermediate_after": 30}
    assert count_parameters(model) == params - 2 * len(dead) * (32 + 1 + 32)
    torch.testing.assert_close(_logits(model, inputs), expected, atol=1e-5, rtol=0)


def test_ffn_pruning_ranks_neurons_by_up_projection_l1(checkpoints):
    from pipeline.pruning.arch import blocks

    model = load_model(checkpoints["bert"])
    block = blocks(model, structured=True)[0]
    norms = block.up.weight.detach().abs().sum(dim=1)
    expected = sorted(torch.topk(norms, 30).indices.tolist())
    kept_rows = block.up.weight.detach()[expected].clone()
    kept_cols = block.down.weight.detach()[:, expected].clone()
    prune_ffn(model, 10)
    assert torch.equal(block.up.weight, kept_rows)  # the 30 largest rows, in their original order
    assert torch.equal(block.down.weight, kept_cols)  # with the matching down-projection columns
    assert (block.up.in_features, block.up.out_features, block.down.in_features) == (32, 30, 30)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_structured_checkpoint_round_trips(checkpoints, model_type, tmp_path):
    from transformers import AutoConfig, AutoModelForTokenClassification

    model = load_model(checkpoints[model_type])
    prune_ffn(model, 15)
    prune_heads(model, 1)
    save_checkpoint(model, checkpoints[model_type], tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    width = config.hidden_dim if model_type == "distilbert" else config.intermediate_size
    assert width == 25
    assert attention_shape(config) == (3, 24)
    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path).eval()
    assert count_parameters(reloaded) == count_parameters(model)
    inputs = _inputs(model.config.vocab_size)
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(model, inputs), atol=0, rtol=0)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "vocab.txt").is_file()


# ------------------------------------------------------------------------------------------ heads


def _kill_heads(model, dead: dict[int, list[int]]) -> None:
    """Heads with zero V and O slices contribute nothing; zero Q/K too so their score is lowest."""
    from pipeline.pruning.arch import blocks, head_size

    with torch.no_grad():
        for block in blocks(model, structured=True):
            d = head_size(model, block)
            for head in dead[block.index]:
                rows = slice(head * d, (head + 1) * d)
                for lin in (block.query, block.key, block.value):
                    lin.weight[rows] = 0.0
                block.value.bias[rows] = 0.0
                block.out.weight[:, rows] = 0.0


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_head_pruning_removes_the_weakest_heads_exactly(checkpoints, model_type, tmp_path):
    model = load_model(checkpoints[model_type])
    dead = {0: [1, 3], 1: [0, 2]}
    _kill_heads(model, dead)
    inputs = _inputs(model.config.vocab_size)
    expected = _logits(model, inputs)
    first = prune_heads(model, 1)  # one at a time: the second call maps current -> original indices
    assert first["heads_before"] == 4 and first["heads_after"] == 3
    second = prune_heads(model, 1)
    assert second["pruned_heads"] == {"0": [1, 3], "1": [0, 2]}
    assert attention_shape(model.config) == (2, 16)
    torch.testing.assert_close(_logits(model, inputs), expected, atol=1e-5, rtol=0)
    save_checkpoint(model, checkpoints[model_type], tmp_path)
    assert check_reload(model, tmp_path) == 0.0
    reloaded = load_model(tmp_path)
    assert {int(k): sorted(v) for k, v in reloaded.config.pruned_heads.items()} == dead


# ----------------------------------------------------------------------------------------- errors


def test_unsupported_architectures_are_refused_by_model_type(checkpoints):
    model = load_model(checkpoints["gpt2"])
    with pytest.raises(InputError, match="model_type 'gpt2'"):
        prune_ffn(model, 4)
    with pytest.raises(InputError, match="model_type 'gpt2'"):
        prune_heads(model, 1)


def test_unstructured_refuses_unknown_architecture(tmp_path):
    from transformers import AlbertConfig, AlbertModel

    config = AlbertConfig(
        vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=40, embedding_size=16
    )
    model = AlbertModel(config)
    with pytest.raises(InputError, match="model_type 'albert'.*supported: bert"):
        apply_magnitude_masks(model, 0.5)


def test_amounts_that_remove_nothing_or_everything_are_refused():
    with pytest.raises(InputError, match="removes 0"):
        ffn_neurons_to_drop(40, 0.01)
    with pytest.raises(InputError, match="removes 40"):
        ffn_neurons_to_drop(40, 0.99)
    with pytest.raises(InputError, match="expected 0 < amount < 1"):
        ffn_neurons_to_drop(40, 1.5)
    with pytest.raises(InputError, match="at least one head must stay"):
        heads_to_drop(4, heads_per_layer=4, amount=None)
    with pytest.raises(InputError, match="drops 0 heads"):
        heads_to_drop(4, heads_per_layer=None, amount=0.1)
    with pytest.raises(InputError, match="prune.amount"):
        apply_magnitude_masks(None, 1.0)
    assert heads_to_drop(12, heads_per_layer=None, amount=0.5) == 6


def test_non_uniform_pruned_heads_are_refused_for_fusion():
    from transformers import BertConfig

    config = BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, pruned_heads={0: [1]})
    with pytest.raises(InputError, match=r"different head counts \[3, 4\]"):
        attention_shape(config)


def test_gzip_bytes_skips_missing_files(tmp_path: Path):
    import gzip

    data = bytes(range(256)) * 1000
    (tmp_path / "a.bin").write_bytes(data)
    size = gzip_bytes(tmp_path / "a.bin", tmp_path / "missing.data")
    assert size == pytest.approx(len(gzip.compress(data, compresslevel=6)), abs=32)
