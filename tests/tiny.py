"""Tiny configs of every family, small enough for 2 CPU cores."""

from __future__ import annotations

import os

import zoo

# Lengths used in tests (13, 37) are not multiples of the chunk size 8.
TINY = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, lightning_chunk_size=8)
# ZOO_TEST_FAMILIES=mamba,hyena narrows the model-level tests while developing a family.
FAMILIES = os.environ.get(
    "ZOO_TEST_FAMILIES", "llama,tnl,hgrn2,cosformer2,mamba,hyena,hybrid,shared"
).split(",")


def tiny_config(family: str, **overrides) -> zoo.ZooConfig:
    if family == "llama":
        return zoo.LlamaConfig(**{**TINY, "num_key_value_heads": 2, **overrides})
    if family == "tnl":
        return zoo.TNLConfig(**{**TINY, **overrides})
    if family == "hgrn2":
        return zoo.HGRN2Config(**{**TINY, "hgrn2_expand_ratio": 16, **overrides})
    if family == "cosformer2":
        return zoo.CosFormer2Config(**{**TINY, **overrides})
    if family == "mamba":
        small = {"mamba_d_state": 4, "mamba_chunk_size": 8}
        return zoo.MambaConfig(**{**TINY, **small, **overrides})
    if family == "hyena":
        small = {"hyena_filter_order": 16, "max_position_embeddings": 256}
        return zoo.HyenaConfig(**{**TINY, **small, **overrides})
    if family == "hybrid":
        # Striped: a KV cache and two kinds of recurrent state in one cache, MoE and dense
        # channel mixers (4 experts, top-2, one shared expert).
        pattern = {
            "mixers": ["lightning", "attention", "mamba"],
            "channel_mixers": ["moe", "swiglu", "moe"],
            "num_key_value_heads": 2,
            "num_experts": 4,
            "moe_intermediate_size": 32,
            "num_shared_experts": 1,
            "mamba_d_state": 4,
            "mamba_chunk_size": 8,
        }
        return zoo.HybridConfig(**{**TINY, **pattern, **overrides})
    if family == "shared":
        # What STAR genomes decode to: gated short convs, per-layer K/V heads, a layer that
        # reuses an earlier mixer's weights, another an earlier channel mixer's, and an attention
        # layer that reads the K/V of the one before it.
        pattern = {
            "num_hidden_layers": 4,
            "mixers": ["gated_conv", "gated_conv", "attention", "attention"],
            "channel_mixers": ["swiglu", "none", "glu", "swiglu"],
            "layer_overrides": [None, None, {"num_key_value_heads": 2}, {"num_key_value_heads": 2}],
            "mixer_weight_source": [None, 0, None, None],
            "channel_mixer_weight_source": [None, None, None, 0],
            "kv_source": [None, None, None, 2],
        }
        return zoo.HybridConfig(**{**TINY, **pattern, **overrides})
    raise ValueError(f"unknown family {family!r}")
