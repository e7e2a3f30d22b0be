"""Sequence and channel mixers, one file per operator, all under the same contract.

A sequence mixer is `Mixer(config, layer_idx)` with
`forward(hidden_states, context, cache=None) -> hidden_states` (parallel form without a cache,
recurrent step with one: it reads and writes its own state at `layer_idx`),
`reference_forward(hidden_states, context)` (the naive form, for tests) and
`state_size(batch, seq_len)` (cache elements it keeps). A channel mixer is
`Mixer(config)` with `forward(hidden_states) -> hidden_states`; the MoE channel mixer
(`zoo.layers.moe.MoE`) also takes the token mask and returns `(hidden_states, router_logits)`.

A module whose paper prescribes a special init defines `init_zoo_weights()` on the module that
owns those parameters directly (transformers skips modules without parameters of their own when
it initialises custom code).
"""

from __future__ import annotations

from importlib import import_module

from torch import nn

from zoo.configuration import SEQUENCE_MIXERS, ZooConfig
from zoo.layers.glu import GLU
from zoo.layers.moe import MoE

# name -> (module, class); imported on first use so a model loads only the mixers it stacks.
_SEQUENCE_MIXER_PATHS: dict[str, tuple[str, str]] = {
    "attention": ("zoo.layers.attention", "Attention"),
    "lightning": ("zoo.layers.lightning", "LightningAttention"),
    "hgrn2": ("zoo.layers.hgrn2", "HGRN2Attention"),
    "cosformer2": ("zoo.layers.cosformer2", "CosFormer2Attention"),
    "mamba": ("zoo.layers.mamba", "MambaMixer"),
    "hyena": ("zoo.layers.hyena", "HyenaOperator"),
    "gated_conv": ("zoo.layers.gated_conv", "GatedShortConv"),
}
assert set(_SEQUENCE_MIXER_PATHS) == set(SEQUENCE_MIXERS)


def sequence_mixer_class(name: str) -> type[nn.Module]:
    module, cls = _SEQUENCE_MIXER_PATHS[name]
    return getattr(import_module(module), cls)


def build_sequence_mixer(config: ZooConfig, layer_idx: int) -> nn.Module:
    """Layer `layer_idx`'s sequence mixer, built with that layer's `layer_overrides`."""
    return sequence_mixer_class(config.mixers[layer_idx])(config.for_layer(layer_idx), layer_idx)


def build_channel_mixer(config: ZooConfig, layer_idx: int) -> nn.Module | None:
    name = config.channel_mixers[layer_idx]
    if name == "none":
        return None
    config = config.for_layer(layer_idx)
    if name == "moe":
        return MoE(config)
    return GLU(config, activation="silu" if name == "swiglu" else "identity")
