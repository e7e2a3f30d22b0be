"""The decode cache: transformers' own `DynamicCache` or `StaticCache`, built from
`ZooConfig.layer_types`.

`DynamicCache(config=config)` already makes one cache layer per model layer from `layer_types`:
a `DynamicLayer` (growing keys/values) for softmax attention and a `LinearAttentionLayer`
(fixed-size recurrent and conv states) for the recurrent mixers, and `generate()` builds it on
its own. `StaticCache(config=config, max_cache_len=n)` (`generate(cache_implementation="static")`)
swaps the growing layers for `StaticLayer`s of n key slots: every tensor of the cache then has a
fixed shape and address, which is what a compiled decode step needs (`zoo.decode`). This module
holds only what transformers lacks.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin, StaticLayer
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask

from zoo.configuration import ZooConfig


def new_cache(config: ZooConfig) -> DynamicCache:
    """An empty cache for `config`'s layers (what `generate()` makes itself)."""
    return DynamicCache(config=config)


def conv_window(cache: Cache, layer_idx: int, kernel_size: int) -> torch.Tensor | None:
    """The K − 1 inputs a causal conv of `kernel_size` K reads before this call, (B, K − 1, C),
    the last of the layer's conv state (B, C, K) in transformers' layout (longer while the layer
    records its past for a later `crop`); None before the first update. Mamba, Mamba2 and Gated
    DeltaNet read it so, then store the call's inputs with `update_conv_state`."""
    conv_state = cache.get_conv_state(layer_idx)  # (B, C, ≥ K) or None
    if conv_state is None:
        return None
    return conv_state[:, :, conv_state.shape[-1] - (kernel_size - 1) :].transpose(1, 2)


def conv_state_in_place(cache: Cache, layer_idx: int) -> torch.Tensor | None:
    """The layer's conv state (B, C, K) where a decode step may update it in place: a window
    of the last K inputs (transformers' layout) that the cache keeps at a fixed size and address.
    None before the first update, and while the layer records its past for a later `crop` (its
    conv state then grows with each call, through `update_conv_state` only)."""
    if not cache.layers[layer_idx].is_compileable:
        return None
    return cache.get_conv_state(layer_idx)


# `recurrent_only` per cache: the answer and the layer count it was computed for.
_RECURRENT_ONLY: weakref.WeakKeyDictionary[Cache, tuple[int, bool]] = weakref.WeakKeyDictionary()


def recurrent_only(cache: Cache) -> bool:
    """`all(cache.is_linear)`: every layer recurrent (no attention keys/values), remembered per
    cache. transformers' property checks two abstract classes per layer at every call (the
    decode loop asks every token); a cache's layers are fixed once built, or only grow (a lazily
    built `DynamicCache`), so the layer count keys the answer. For the decode loop's Python,
    not for a traced forward."""
    seen = _RECURRENT_ONLY.get(cache)
    if seen is None or seen[0] != len(cache.layers):
        seen = _RECURRENT_ONLY[cache] = (len(cache.layers), all(cache.is_linear))
    return seen[1]


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


def has_static_attention(cache: Cache | None) -> bool:
    """Whether some layer of `cache` keeps keys in fixed slots (`StaticLayer`): its attention then
    needs a mask over all the slots, filled or not."""
    return cache is not None and any(isinstance(layer, StaticLayer) for layer in cache.layers)


def static_masks(
    config: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> dict[str, torch.Tensor | None] | torch.Tensor | None:
    """The masks a forward over a static cache needs, per layer type (what `generate()` asks the
    model for through `create_masks_for_generate`):

    - "full_attention": (B, 1, T, S) over the cache's S key slots, causal, padding and unfilled
      slots excluded. Always materialised: transformers' default may return None to let SDPA use
      `is_causal`, which over fixed slots would also see the unfilled ones.
    - "linear_attention": the current tokens' (B, T) padding, None when nothing is padded.

    Any other cache (dynamic) gets the 2-D mask back: the model derives its masks itself.
    """
    if not has_static_attention(cache):
        return attention_mask
    kwargs = {
        "config": config,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "cache": cache,
        "position_ids": position_ids,
    }
    return {
        "full_attention": create_causal_mask(**kwargs, allow_is_causal_skip=False),
        "linear_attention": create_recurrent_attention_mask(**kwargs),
    }


def static_step_masks(
    cache: Cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor | None]:
    """`static_masks` of one decode token (the last of `input_ids`, (B, L)) over a static cache:
    it attends to the filled slots and its own (those up to the layers' fill counter), less the
    padding its 2-D mask marks, which covers the whole sequence (transformers' contract); a
    decode token is never padding, so the recurrent layers get no mask. The same values as
    `static_masks` (tests/test_decode.py) in a few tensor operations (a new contiguous tensor),
    where transformers' general mask functions take ~70 µs a step on the project's CPU (a few
    percent of a compiled step)."""
    layer = next(layer for layer in cache.layers if isinstance(layer, StaticLayer))
    slots = torch.arange(layer.max_cache_len, device=input_ids.device)
    attend = (slots <= layer.get_seq_length()).expand(input_ids.shape[0], -1)
    if attention_mask is None:
        attend = attend.contiguous()
    else:
        mask = attention_mask[:, : layer.max_cache_len].bool()
        attend = attend & F.pad(mask, (0, layer.max_cache_len - mask.shape[1]), value=False)
    return {"full_attention": attend[:, None, None, :], "linear_attention": None}
