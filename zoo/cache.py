"""The decode cache: transformers' own `DynamicCache`, built from `ZooConfig.layer_types`.

`DynamicCache(config=config)` already makes one cache layer per model layer from `layer_types`:
a `DynamicLayer` (growing keys/values) for softmax attention and a `LinearAttentionLayer`
(fixed-size recurrent and conv states) for the recurrent mixers, and `generate()` builds it on
its own. This module holds only the two things transformers lacks.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin

from zoo.configuration import ZooConfig


def new_cache(config: ZooConfig) -> DynamicCache:
    """An empty cache for `config`'s layers (what `generate()` makes itself)."""
    return DynamicCache(config=config)


def recurrent_state(cache: Cache, layer_idx: int) -> torch.Tensor | None:
    """The recurrent state stored for `layer_idx`, or None before the first update.

    `Cache.get_recurrent_state` answers only after a conv-state update has set the layer's
    `has_previous_state` flag, so a mixer with a recurrent state and no conv state would never
    see its own state; we read the slot directly. After `cache.reset()` the slot holds zeros,
    which is the empty state of every linear recurrence, so reading it is still exact.
    """
    layer = cache.layers[layer_idx]
    if not isinstance(layer, LinearAttentionCacheLayerMixin):
        raise TypeError(f"cache layer {layer_idx} is {type(layer).__name__}, not a recurrent layer")
    if not layer.is_recurrent_states_initialized[0]:
        return None
    return layer.recurrent_states[0]


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by every tensor of the cache: keys/values, recurrent and conv states."""
    total = 0
    for layer in cache.layers:
        tensors: list[torch.Tensor | None] = []
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            tensors += list(layer.recurrent_states.values()) + list(layer.conv_states.values())
        tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total
