"""zoo convert takes today's transformers Llama checkpoints exactly: RoPE scaling ("linear",
"yarn", "llama3", "longrope", with transformers' own frequency tables), attention and MLP biases
and an explicit head_dim; both ways, bit for bit. What zoo lacks ("dynamic" RoPE, sliding
windows) is refused before any weight loads."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import zoo
from zoo.convert import (
    HF_TO_ZOO,
    ZOO_TO_HF,
    convert_checkpoint,
    from_hf_llama,
    llama_config_from_hf,
    to_hf_llama,
)

ATOL = 1e-5
SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
)
ORIGINAL = 16  # original_max_position_embeddings: the test inputs (48 tokens) reach past it
LLAMA3 = {  # Llama 3.1's RoPE scaling, with a short original context
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": ORIGINAL,
    "rope_theta": 500000.0,
}
VARIANTS = {
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "llama3": dict(
        rope_parameters=LLAMA3,
        max_position_embeddings=128,
    ),
    "yarn": dict(
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
            "rope_theta": 10000.0,
        },
        max_position_embeddings=4 * ORIGINAL,
    ),
    "longrope": dict(
        rope_parameters={
            "rope_type": "longrope",
            "short_factor": [1.0, 1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0],  # head_dim / 2 = 8 each
            "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
            "original_max_position_embeddings": ORIGINAL,
            "rope_theta": 10000.0,
        },
        max_position_embeddings=4 * ORIGINAL,  # attention factor sqrt(1 + ln 4 / ln 16)
    ),
    "biases_head_dim": dict(
        attention_bias=True,
        mlp_bias=True,
        head_dim=32,  # q/k/v/o are 4 x 32 = 128 wide on a 64-wide model
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "llama3_biases_head_dim": dict(
        attention_bias=True,
        mlp_bias=True,
        head_dim=32,
        rope_parameters=LLAMA3,
    ),
}
# transformers config fields that must survive zoo -> transformers.
FIELDS = (
    *SIZES,
    "head_dim",
    "attention_bias",
    "mlp_bias",
    "rope_parameters",
    "max_position_embeddings",
    "tie_word_embeddings",
    "rms_norm_eps",
)


def hf_llama(name: str, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**SIZES, initializer_range=0.1, **VARIANTS[name])
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # nonzero biases and norm gains, so that a lost one would show
        for key, param in model.named_parameters():
            if key.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            elif key.endswith("norm.weight"):
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return model


def ids(length: int = 48, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, SIZES["vocab_size"], (2, length), generator=gen)


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hf_to_zoo_same_logits_and_greedy_tokens(name):
    hf = hf_llama(name)
    model = from_hf_llama(hf)
    tokens = ids()
    expected = logits(hf, tokens)
    diff = max_diff(logits(model, tokens), expected)
    print(f"{name}: max |logit difference| = {diff:.3g}")
    assert diff <= ATOL, f"max abs logit difference {diff:.3g} > {ATOL}"
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    prompt = tokens[:, :24]  # 24 + 20 positions, past original_max_position_embeddings = 16
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=mask, **kwargs)
        got = model.generate(prompt, attention_mask=mask, **kwargs)
    assert got.shape == (2, 44)
    assert torch.equal(got, want)


def test_longrope_switches_tables_per_call_as_transformers():
    """longrope takes its short factors while the call's positions fit in the original context
    and its long ones past it, per call: a 10-token prompt decodes across the switch at 16."""
    hf = hf_llama("longrope")
    model = from_hf_llama(hf)
    short = ids(length=12)
    assert max_diff(logits(model, short), logits(hf, short)) <= ATOL
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    prompt = short[:, :10]
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=mask, **kwargs)
        got = model.generate(prompt, attention_mask=mask, **kwargs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["linear", "llama3", "yarn", "longrope"])
def test_rope_scaling_changes_the_logits(name):
    """The scaled tables act at these lengths: plain RoPE gives other logits."""
    model = from_hf_llama(hf_llama(name))
    plain = zoo.LlamaConfig(**{**model.config.to_dict(), "rotary_scaling": None})
    other = zoo.LlamaForCausalLM(plain).eval()
    other.load_state_dict(model.state_dict())
    assert max_diff(logits(other, ids()), logits(model, ids())) > 1e-3


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trips_are_bit_identical(name):
    hf = hf_llama(name)
    model = from_hf_llama(hf)
    back = to_hf_llama(model)
    before, after = hf.state_dict(), back.state_dict()
    assert set(before) == set(after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    for field in FIELDS:
        assert getattr(back.config, field) == getattr(hf.config, field), field
    again = from_hf_llama(back)
    for key, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key
    assert again.config.to_diff_dict() == model.config.to_diff_dict()


def test_settings_and_shapes():
    config = llama_config_from_hf(hf_llama("llama3_biases_head_dim").config)
    assert config.rotary_base == 500000.0
    assert config.rotary_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
    }
    assert (config.attention_head_dim, config.attention_bias, config.mlp_bias) == (32, True, True)
    layer = zoo.LlamaForCausalLM(config).model.layers[0]
    assert layer.mixer.q_proj.weight.shape == (128, 64)
    assert layer.mixer.k_proj.bias.shape == (64,)
    assert layer.mixer.o_proj.weight.shape == (64, 128)
    assert layer.channel_mixer.down_proj.bias.shape == (64,)
    # Defaults are today's model: no biases, head_dim = hidden / heads, plain RoPE.
    plain = llama_config_from_hf(transformers.LlamaConfig(**SIZES))
    assert (plain.rotary_scaling, plain.attention_head_dim) == (None, None)
    assert (plain.attention_bias, plain.mlp_bias) == (False, False)


@pytest.mark.parametrize("name", ["yarn", "llama3_biases_head_dim"])
def test_convert_checkpoint_both_ways(tmp_path, name):
    hf = hf_llama(name, seed=4)
    src, zoo_dir, hf_dir = tmp_path / "hf", tmp_path / "zoo", tmp_path / "hf_again"
    hf.save_pretrained(src)
    expected = logits(hf, ids())
    assert convert_checkpoint(src, zoo_dir) == HF_TO_ZOO
    stored = json.loads((zoo_dir / "config.json").read_text())
    assert stored["rotary_scaling"]["rope_type"] == hf.config.rope_parameters["rope_type"]
    model = AutoModelForCausalLM.from_pretrained(zoo_dir).eval()
    assert max_diff(logits(model, ids()), expected) <= ATOL
    assert convert_checkpoint(zoo_dir, hf_dir) == ZOO_TO_HF
    again = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(again) is transformers.LlamaForCausalLM
    for key, tensor in hf.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


def _config_only(tmp_path, config: transformers.PretrainedConfig):
    """A checkpoint folder with a config and no weights: refusing it proves no weight loaded."""
    config.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def test_dynamic_rope_refused_before_loading(tmp_path):
    config = transformers.LlamaConfig(
        **SIZES, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    )
    with pytest.raises(ValueError, match=r"rope_parameters\['rope_type'\]='dynamic'") as info:
        convert_checkpoint(_config_only(tmp_path, config), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_mixtral_sliding_window_refused_before_loading(tmp_path):
    config = transformers.MixtralConfig(
        **SIZES, num_local_experts=4, num_experts_per_tok=2, sliding_window=32
    )
    with pytest.raises(ValueError, match="sliding_window=32") as info:
        convert_checkpoint(_config_only(tmp_path, config), tmp_path / "out")
    assert "\n" not in str(info.value)


def test_mistral_refused_before_loading(tmp_path):
    config = transformers.MistralConfig(**SIZES, sliding_window=32)
    with pytest.raises(ValueError, match="model_type='mistral'") as info:
        convert_checkpoint(_config_only(tmp_path, config), tmp_path / "out")
    assert "\n" not in str(info.value)


def test_bad_rotary_scaling_setting_refused():
    with pytest.raises(ValueError, match="rotary_scaling"):
        zoo.LlamaConfig(**SIZES, rotary_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="rotary_scaling"):
        zoo.LlamaConfig(**SIZES, rotary_scaling={"rope_type": "llama3", "factor": 8.0})


@pytest.mark.parametrize("name", ["yarn", "llama3_biases_head_dim"])
def test_zoo_layer_forms_agree_with_new_settings(name):
    """The attention's parallel form = its naive reference, and a left-padded row gives the
    logits of the same row alone, with scaled RoPE, biases and an explicit head_dim."""
    from zoo.layers.context import MixerContext

    model = from_hf_llama(hf_llama(name))
    layer = model.model.layers[0].mixer
    x = torch.randn(2, 40, SIZES["hidden_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        parallel = layer(x, MixerContext.build(None, None, 2, 40, 0, x.device))
        naive = layer.reference_forward(x, MixerContext.build(None, None, 2, 40, 0, x.device))
    assert max_diff(parallel, naive) <= 1e-5
    tokens = ids(length=30)
    padded = torch.cat([torch.zeros(1, 5, dtype=tokens.dtype), tokens[:1]], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(input_ids=tokens[:1]).logits
        left = model(input_ids=padded, attention_mask=mask).logits[:, 5:]
    assert max_diff(left, alone) <= 1e-5
