"""Sequence and channel mixers, one file per operator, all under the same contract.

A sequence mixer is `Mixer(config, layer_idx)` with
`forward(hidden_states, context, cache=None) -> hidden_states` (parallel form without a cache,
recurrent step with one: it reads and writes its own state at `layer_idx`),
`reference_forward(hidden_states, context)` (the naive form, for tests) and
`state_size(batch, seq_len)` (cache elements it keeps). A channel mixer is
`Mixer(config)` with `forward(hidden_states) -> hidden_states`.
"""

from __future__ import annotations

from torch import nn

from zoo.configuration import ZooConfig
from zoo.layers.attention import Attention
from zoo.layers.glu import GLU
from zoo.layers.lightning import LightningAttention

SEQUENCE_MIXER_CLASSES: dict[str, type[nn.Module]] = {
    "attention": Attention,
    "lightning": LightningAttention,
}


def build_sequence_mixer(config: ZooConfig, layer_idx: int) -> nn.Module:
    return SEQUENCE_MIXER_CLASSES[config.mixers[layer_idx]](config, layer_idx)


def build_channel_mixer(config: ZooConfig, layer_idx: int) -> nn.Module | None:
    name = config.channel_mixers[layer_idx]
    if name == "none":
        return None
    return GLU(config, activation="silu" if name == "swiglu" else "identity")
