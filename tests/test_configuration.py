"""Config validation and the named sizes of the scaling-law paper (arXiv 2406.16690)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import zoo


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mixers": ["attention", "mamba3", "attention", "attention"]}, r"mixers\[1\]='mamba3'"),
        ({"mixers": ["attention"] * 3}, "mixers has 3 entries but num_hidden_layers=4"),
        ({"channel_mixers": ["swiglu"] * 5}, "channel_mixers has 5 entries"),
        ({"channel_mixers": ["swiglu", "relu", "swiglu", "swiglu"]}, r"channel_mixers\[1\]='relu'"),
        ({"num_attention_heads": 6}, "num_attention_heads=6 does not divide hidden_size=256"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide"),
        ({"hidden_size": -8}, "hidden_size=-8 must be a positive integer"),
        ({"num_hidden_layers": 0}, "num_hidden_layers=0 must be a positive integer"),
        ({"intermediate_size": 0}, "intermediate_size=0"),
        ({"vocab_size": -1}, "vocab_size=-1"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps=0.0 must be positive"),
        ({"norm_type": "groupnorm"}, "norm_type='groupnorm' is not one of"),
        ({"lightning_decay": "learned"}, "lightning_decay='learned'"),
        ({"kernel_backend": "cuda"}, "kernel_backend='cuda'"),
        ({"output_gate_rank": 0}, "output_gate_rank=0"),
        ({"mamba_d_state": 0}, "mamba_d_state=0"),
        ({"mamba_dt_max": float("inf")}, "mamba_dt_max=inf must be a finite number"),
        (
            {"mixers": ["mamba"] * 4, "mamba_dt_min": 0.5, "mamba_dt_max": 0.1},
            "0 < mamba_dt_min <= mamba_dt_max",
        ),
        ({"mamba_conv_bias": "yes"}, "mamba_conv_bias='yes' must be True or False"),
        ({"hyena_order": 1}, "hyena_order=1 must be an integer >= 2"),
        ({"hyena_emb_dim": 4}, "hyena_emb_dim=4 must be an odd integer >= 3"),
        (
            {"mixers": ["hgrn2"] * 4, "hgrn2_expand_ratio": 48},
            "hgrn2_expand_ratio=48 does not divide",
        ),
    ],
)
def test_bad_config_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        zoo.LlamaConfig(**fields)


_STRIPE = {
    "mixers": ["attention", "gated_conv", "attention", "mamba"],
    "channel_mixers": ["swiglu"] * 4,
}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"layer_overrides": [None] * 3}, "layer_overrides must be None or a list with one entry"),
        (
            {"layer_overrides": [{"hidden_size": 8}, None, None, None]},
            r"layer_overrides\[0\]\.hidden_size: not a per-layer field",
        ),
        (
            {"layer_overrides": [{"num_key_value_heads": 3}, None, None, None]},
            r"layer_overrides\[0\]: num_key_value_heads=3 does not divide",
        ),
        (
            {"mixers": ["hgrn2"] * 4, "hgrn2_expand_ratio": 16,
             "layer_overrides": [None, {"hgrn2_expand_ratio": 48}, None, None]},
            r"layer_overrides\[1\]: hgrn2_expand_ratio=48 does not divide",
        ),
        ({"mixer_weight_source": [None, None, 2, None]}, "must be None or an earlier layer"),
        ({"mixer_weight_source": [None, 0, None, None]}, "layer 1 is 'gated_conv', layer 0"),
        ({"mixer_weight_source": [None, None, 0, 2]}, "layer 2 takes its own from layer 0"),
        ({"channel_mixers": ["swiglu", "none", "swiglu", "none"],
          "channel_mixer_weight_source": [None, None, None, 1]}, "has no channel mixer to share"),
        ({"kv_source": [None, None, None, 1]}, "layer 3 is 'mamba'"),
        ({"kv_source": [None, None, 0, None],
          "layer_overrides": [None, None, {"num_key_value_heads": 2}, None]},
         "layer 2 has 2 K/V heads, layer 0 4"),
        ({"mixer_weight_source": [None, None, 0, None],
          "layer_overrides": [None, None, {"num_key_value_heads": 2}, None]},
         "different layer_overrides"),
        ({"mixer_weight_source": [None, None, 0, None], "kv_source": [None, None, 0, None]},
         "has no K/V projections to share"),
    ],
)  # fmt: skip
def test_bad_sharing_names_the_layer(fields, message):
    with pytest.raises(ValueError, match=message):
        zoo.HybridConfig(**{**_STRIPE, **fields})


def test_layer_overrides_change_only_their_layer():
    config = zoo.HybridConfig(
        **_STRIPE,
        layer_overrides=[{"num_key_value_heads": 1, "intermediate_size": 64}, None, None, None],
    )
    model = AutoModelForCausalLM.from_config(config)
    first, third = model.model.layers[0], model.model.layers[2]
    assert first.mixer.k_proj.out_features == config.head_dim
    assert third.mixer.k_proj.out_features == config.hidden_size
    assert first.channel_mixer.up_proj.out_features == 64
    assert third.channel_mixer.up_proj.out_features == config.intermediate_size


def test_unknown_mixer_error_lists_the_allowed_ones():
    with pytest.raises(
        ValueError, match=r"mixers\[0\]='s4' .* allowed: \['attention', 'cosformer2'"
    ):
        zoo.TNLConfig(mixers=["s4"] * 4)


def test_base_config_needs_explicit_mixers():
    with pytest.raises(ValueError, match="has no default mixer"):
        zoo.ZooConfig()
    hybrid = zoo.ZooConfig(
        num_hidden_layers=2, mixers=["lightning", "attention"], channel_mixers=["glu", "swiglu"]
    )
    assert hybrid.layer_types == ["linear_attention", "full_attention"]


def test_unknown_named_size():
    with pytest.raises(ValueError, match="size='13b' is not a named size of TNLConfig"):
        zoo.TNLConfig.from_size("13b")


def test_presets_fill_their_family():
    tnl, llama = zoo.TNLConfig(num_hidden_layers=3), zoo.LlamaConfig(num_hidden_layers=3)
    assert tnl.mixers == ["lightning"] * 3 and tnl.channel_mixers == ["glu"] * 3
    assert tnl.norm_type == "srmsnorm"
    assert llama.mixers == ["attention"] * 3 and llama.channel_mixers == ["swiglu"] * 3
    assert llama.norm_type == "rmsnorm"


# Non-embedding parameters in millions, arXiv 2406.16690 Table 7.
PAPER_NON_EMBEDDING_M = {
    "llama": {"70m": 20.5, "160m": 85.0, "410m": 334.1, "1b": 906.2, "3b": 2775.8, "7b": 6476.5},
    "tnl": {"70m": 21.2, "160m": 87.3, "410m": 327.7, "1b": 918.6, "3b": 2798.4, "7b": 6509.6},
    "hgrn2": {"70m": 20.5, "160m": 84.9, "410m": 334.0, "1b": 906.0, "3b": 2775.5, "7b": 6476.1},
    "cosformer2": {
        "70m": 21.3,
        "160m": 87.5,
        "410m": 328.0,
        "1b": 919.1,
        "3b": 2799.0,
        "7b": 6511.0,
    },
}
SL_PRESETS = {
    "llama": zoo.LlamaConfig,
    "tnl": zoo.TNLConfig,
    "hgrn2": zoo.HGRN2Config,
    "cosformer2": zoo.CosFormer2Config,
}


def _count(config: zoo.ZooConfig, exclude_embeddings: bool) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.num_parameters(exclude_embeddings=exclude_embeddings)


@pytest.mark.parametrize("family", sorted(SL_PRESETS))
@pytest.mark.parametrize("size", ["70m", "160m", "410m", "1b", "3b", "7b"])
def test_named_size_parameter_count_matches_the_paper(family, size):
    """Counts the real modules, built on the meta device, against the paper's table (2%).

    Where the table is inconsistent (the 1B row lists g = 5632 and 16 heads), the preset uses
    g = 4096 and 12 heads (head dim 128), the values that reproduce its own counts:
    LLaMA 4ld² + 3ldg, HGRN2 4ld² + 3ldg + ld (the lower bounds), TNL and cosFormer2
    4ld² + 2ldt + 3ldg with t = d/h = 128 (cosFormer2's TPE, d²/h, is not built: < 0.3%).
    """
    config = SL_PRESETS[family].from_size(size, vocab_size=100_280)
    non_embedding = _count(config, exclude_embeddings=True)
    expected = PAPER_NON_EMBEDDING_M[family][size] * 1e6
    assert abs(non_embedding - expected) / expected < 0.02, (non_embedding, expected)
    assert config.tie_word_embeddings and config.head_dim == 128


# Released Mamba checkpoints (state-spaces/mamba README), named by their total parameters with
# the GPT-NeoX vocabulary padded to 50280. The MAD paper's scaling table was not available.
MAMBA_TOTAL = {"130m": 130e6, "370m": 370e6, "790m": 790e6, "1.4b": 1.4e9, "2.8b": 2.8e9}


@pytest.mark.parametrize("size", sorted(MAMBA_TOTAL))
def test_mamba_named_size_matches_the_released_models(size):
    """Per layer: in_proj 2dE·d, conv E·d·(K+1), x_proj E·d·(R+2N), dt_proj (R+1)·E·d,
    A_log E·d·N, D E·d, out_proj E·d·d, norm d; E = 2, N = 16, K = 4, R = ceil(d/16)."""
    config = zoo.MambaConfig.from_size(size, vocab_size=50_280)
    total = _count(config, exclude_embeddings=False)
    assert abs(total - MAMBA_TOTAL[size]) / MAMBA_TOTAL[size] < 0.02, total
    if size == "130m":
        assert total == 129_135_360  # mamba-130m-hf, counted by the formula above


# safari's Hyena models, named by total parameters with GPT-2's vocabulary padded to 50264.
HYENA_TOTAL = {"153m": 153e6, "355m": 355e6, "1.3b": 1.3e9, "2.7b": 2.7e9}


@pytest.mark.parametrize("size", sorted(HYENA_TOTAL))
def test_hyena_named_size_matches_safari(size):
    """Per layer: the operator 4d² + 81d + 10560 at order 2 (in_proj, short conv, filter FFN,
    skip weights, out_proj; see tests/layers/test_hyena.py) + SwiGLU 3dg + 2 norms."""
    config = zoo.HyenaConfig.from_size(size, vocab_size=50_264)
    assert config.max_position_embeddings == 2048
    total = _count(config, exclude_embeddings=False)
    assert abs(total - HYENA_TOTAL[size]) / HYENA_TOTAL[size] < 0.02, total


# Released Mamba2 checkpoints (state-spaces/mamba README: mamba2-130m ... mamba2-2.7b), named by
# their total parameters with the GPT-NeoX vocabulary padded to 50280, rounded down (the 48 x
# 2048 model counts 1.34B).
MAMBA2_TOTAL = {"130m": 130e6, "370m": 370e6, "780m": 780e6, "1.3b": 1.3e9, "2.7b": 2.7e9}


@pytest.mark.parametrize("size", sorted(MAMBA2_TOTAL))
def test_mamba2_named_size_matches_the_released_models(size):
    config = zoo.Mamba2Config.from_size(size, vocab_size=50_280)
    assert (config.mamba2_d_state, config.mamba2_head_dim, config.mamba2_expand) == (128, 64, 2)
    total = _count(config, exclude_embeddings=False)
    assert -0.01 < (total - MAMBA2_TOTAL[size]) / MAMBA2_TOTAL[size] < 0.04, total


def test_production_hybrid_presets_keep_their_layouts():
    jamba = zoo.HybridConfig.from_size("jamba-like-mamba2-moe-440m-a210m")
    assert jamba.mixers.count("mamba2") == 7 * jamba.mixers.count("attention") == 14
    assert [i for i, m in enumerate(jamba.mixers) if m == "attention"] == [4, 12]
    assert jamba.channel_mixers == ["swiglu", "moe"] * 8  # MoE every other layer
    qwen = zoo.HybridConfig.from_size("qwen3-next-like-gdn-moe-580m-a240m")
    assert qwen.mixers == ["gated_deltanet"] * 3 + ["attention"] + ["gated_deltanet"] * 3 + [
        "attention"
    ] + ["gated_deltanet"] * 3 + ["attention"]
    assert set(qwen.channel_mixers) == {"moe"} and qwen.num_shared_experts == 1
    assert qwen.gdn_num_v_heads == 2 * qwen.gdn_num_heads
