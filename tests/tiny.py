"""Tiny configs of every registered family (and of the STAR-style "shared" stack), small enough
for 2 CPU cores: `zoo.registry.Family.tiny_config`, plus what only the tests need."""

from __future__ import annotations

import os

import zoo
from zoo import registry

# ZOO_TEST_FAMILIES=mamba,hyena narrows the model-level tests while developing a family.
FAMILIES = os.environ.get("ZOO_TEST_FAMILIES", ",".join([*registry.families(), "shared"])).split(
    ","
)


def tiny_config(family: str, **overrides) -> zoo.ZooConfig:
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
        return zoo.HybridConfig(**{**registry.TINY_BACKBONE, **pattern, **overrides})
    return registry.family(family).tiny_config(**overrides)


def tiny_mixer_config(mixer: str, **overrides) -> zoo.ZooConfig:
    """Three blocks of one sequence mixer with SwiGLU: what the mixer-level tests build."""
    fields = {**registry.TINY_BACKBONE, **registry.sequence_mixer(mixer).tiny}
    return zoo.HybridConfig.from_pattern(f"{mixer}:swiglu*3", **{**fields, **overrides})
