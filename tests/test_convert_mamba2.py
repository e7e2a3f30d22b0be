"""transformers' Mamba2ForCausalLM <-> zoo's Mamba2: the converted model gives transformers' logits
(its torch path) and greedy tokens, padded and cached too; converting back is bit-identical;
checkpoints convert both ways; what zoo cannot express is refused naming the field."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import zoo
from zoo.convert import (
    MAMBA2_HF_TO_ZOO,
    MAMBA2_ZOO_TO_HF,
    convert_checkpoint,
    from_hf_mamba2,
    mamba2_config_from_hf,
    mamba2_config_to_hf,
    mamba2_state_dict_from_hf,
    to_hf_mamba2,
)
from zoo.tokenizer import byte_tokenizer

# Eight heads of 16 in two groups, chunks of 16 (so 50 tokens span partial chunks on both sides).
SIZES = dict(
    vocab_size=300, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, expand=2,
    state_size=16, n_groups=2, chunk_size=16,
)  # fmt: skip


def hf_mamba2(tie: bool = False, seed: int = 0, **overrides) -> transformers.Mamba2ForCausalLM:
    torch.manual_seed(seed)
    config = transformers.Mamba2Config(
        **{**SIZES, **overrides}, tie_word_embeddings=tie, pad_token_id=0, initializer_range=0.1
    )
    model = transformers.Mamba2ForCausalLM(config).eval()
    with torch.no_grad():  # D, the norm gains and the Δ bias away from their inits
        for name, param in model.named_parameters():
            if name.endswith((".D", "norm.weight", "dt_bias")):
                param.add_(0.3 * torch.randn_like(param))
    return model


def ids(seed: int = 0, length: int = 50) -> torch.Tensor:
    return torch.randint(
        1, SIZES["vocab_size"], (2, length), generator=torch.Generator().manual_seed(seed)
    )


def logits(model: torch.nn.Module, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, **kwargs).logits


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert expected.abs().max() > 1.0  # logits of order one: 1e-5 is a tight check
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("use_bias", [False, True], ids=["no-bias", "bias"])
def test_hf_to_zoo_same_logits(tie, use_bias):
    hf = hf_mamba2(tie, use_bias=use_bias)
    model = from_hf_mamba2(hf)
    assert isinstance(model, zoo.Mamba2ForCausalLM)
    tokens = ids()
    assert_close(logits(model, tokens), logits(hf, tokens))


def test_hf_to_zoo_greedy_generate_left_padded():
    hf = hf_mamba2(seed=3)
    model = from_hf_mamba2(hf)
    tokens = ids(seed=3, length=11)
    tokens[0, :3] = 0
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    options = dict(
        attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
    )
    with torch.no_grad():
        expected = hf.generate(tokens, **options)
        got = model.generate(tokens, **options)
    assert expected.shape == (2, 19)
    assert torch.equal(got, expected)


def test_cached_decode_matches_hf():
    hf = hf_mamba2(seed=4)
    model = from_hf_mamba2(hf)
    tokens = ids(seed=4, length=24)
    with torch.no_grad():
        ours, theirs = model(tokens[:, :17], use_cache=True), hf(tokens[:, :17], use_cache=True)
        outs, refs = [ours.logits], [theirs.logits]
        for t in range(17, 24):
            ours = model(tokens[:, t : t + 1], cache=ours.cache, use_cache=True)
            theirs = hf(tokens[:, t : t + 1], cache=theirs.cache, use_cache=True)
            outs.append(ours.logits)
            refs.append(theirs.logits)
    assert_close(torch.cat(outs, dim=1), torch.cat(refs, dim=1))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip_is_bit_identical(tie):
    hf = hf_mamba2(tie, seed=1)
    back = to_hf_mamba2(from_hf_mamba2(hf))
    assert type(back) is transformers.Mamba2ForCausalLM
    original, again = hf.state_dict(), back.state_dict()
    assert original.keys() == again.keys()
    for key, tensor in original.items():
        assert torch.equal(again[key], tensor), key
    for field in (
        "num_heads",
        "head_dim",
        "n_groups",
        "state_size",
        "chunk_size",
        "time_step_limit",
    ):
        assert getattr(back.config, field) == getattr(hf.config, field), field


def test_dt_limit_converts_both_ways():
    config = mamba2_config_from_hf(transformers.Mamba2Config(**SIZES, time_step_limit=(0.01, 2.0)))
    assert config.mamba2_dt_limit == [0.01, 2.0]
    assert tuple(mamba2_config_to_hf(config).time_step_limit) == (0.01, 2.0)
    unclamped = mamba2_config_from_hf(transformers.Mamba2Config(**SIZES))
    assert unclamped.mamba2_dt_limit is None
    assert tuple(mamba2_config_to_hf(unclamped).time_step_limit) == (0.0, math.inf)
    hf = hf_mamba2(seed=2, time_step_limit=(0.05, 0.2))  # the clamp acts on these weights
    tokens = ids(seed=2)
    assert_close(logits(from_hf_mamba2(hf), tokens), logits(hf, tokens))


def test_convert_checkpoint_both_ways(tmp_path):
    hf = hf_mamba2(seed=5)
    src, zoo_dir, hf_dir = tmp_path / "hf", tmp_path / "zoo", tmp_path / "hf_again"
    hf.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    tokens = ids(seed=5)
    expected = logits(hf, tokens)
    assert convert_checkpoint(src, zoo_dir) == MAMBA2_HF_TO_ZOO
    assert json.loads((zoo_dir / "config.json").read_text())["model_type"] == "zoo_mamba2"
    model = AutoModelForCausalLM.from_pretrained(zoo_dir)
    assert isinstance(model, zoo.Mamba2ForCausalLM)
    assert_close(logits(model.eval(), tokens), expected)
    assert (zoo_dir / "tokenizer.json").is_file()
    assert convert_checkpoint(zoo_dir, hf_dir) == MAMBA2_ZOO_TO_HF
    again = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(again) is transformers.Mamba2ForCausalLM
    assert_close(logits(again.eval(), tokens), expected)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(num_heads=4), "num_heads=4"),
        (dict(model_type="bamba"), "model_type='bamba'"),
    ],
)
def test_unrepresentable_hf_config_refused(overrides, field):
    config = transformers.Mamba2Config(**SIZES)
    for name, value in overrides.items():
        setattr(config, name, value)
    with pytest.raises(ValueError, match=field):
        mamba2_config_from_hf(config)


def test_unknown_key_and_other_zoo_models_refused():
    state = dict(hf_mamba2().state_dict())
    state["backbone.layers.0.mixer.x_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"mixer\.x_proj\.weight.*Mamba2ForCausalLM"):
        mamba2_state_dict_from_hf(state)
    mamba = zoo.MambaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"mixers\[0\]='mamba'"):
        mamba2_config_to_hf(mamba)
