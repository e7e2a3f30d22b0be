"""Sequence and channel mixers, one file per operator, all under the same contract.

What a mixer must provide is stated by `zoo.registry.SequenceMixerLayer` and
`zoo.registry.ChannelMixerLayer`; which class a mixer name stands for, by its registry entry.
A module whose paper prescribes a special init defines `init_zoo_weights()` on the module that
owns those parameters directly (transformers skips modules without parameters of their own when
it initialises custom code).
"""

from __future__ import annotations

from torch import nn

from zoo import registry
from zoo.configuration import ZooConfig


def build_sequence_mixer(config: ZooConfig, layer_idx: int) -> nn.Module:
    """Layer `layer_idx`'s sequence mixer, built with that layer's `layer_overrides`."""
    layer = registry.sequence_mixer(config.mixers[layer_idx]).layer_class()
    return layer(config.for_layer(layer_idx), layer_idx)


def build_channel_mixer(config: ZooConfig, layer_idx: int) -> nn.Module | None:
    """Layer `layer_idx`'s channel mixer (None where it is "none")."""
    layer = registry.channel_mixer(config.channel_mixers[layer_idx]).layer_class()
    return None if layer is None else layer(config.for_layer(layer_idx))
