"""What every sequence mixer needs to know about the tokens of one forward call.

The model builds one `MixerContext` per forward, so masks and positions are derived once, not
once per layer.

Under context parallelism (`zoo.parallel.context`: the model runs inside `context_parallel(group)`
on its rank's span of the sequence) the context carries the group (`cp`) and the span's place in
the whole sequence (`offset`): positions are global (offset + local position), and a mixer reads
`cp` to fetch what earlier spans contribute to its own. Padding masks are refused there (see
`build`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from zoo.layers.rotary import rotary_cos_sin
from zoo.parallel.context import ContextParallel


@dataclass
class MixerContext:
    position_ids: torch.Tensor
    """(B, T) positions of the current tokens (padding-aware: left padding does not shift them)."""
    token_mask: torch.Tensor | None = None
    """(B, T) bool, False at padded current tokens; None when nothing is padded."""
    key_mask: torch.Tensor | None = None
    """(B, S) bool over all tokens seen so far (cache + current); None when nothing is padded."""
    parameters: dict[str, torch.Tensor] = field(default_factory=dict)
    """The parameters the model holds for all layers of a mixer (`zoo.registry.ModelParameter`),
    by name, e.g. HGRN2's lower bounds Γ (L, d). A mixer derives what it needs from them in its
    own forward, so gradient checkpointing (reentrant too) recomputes that per block."""
    shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Keys and values (cache + current, after RoPE) of attention layers that later layers read
    (`ZooConfig.kv_source`), by layer index; filled as the forward reaches them."""
    cp: ContextParallel | None = None
    """The context-parallel group this forward's sequence is split over (None: not split). The
    current tokens are then this rank's span, tokens [offset, offset + T) of the whole sequence."""
    offset: int = 0
    """Under context parallelism, the position of this span's first token in the whole sequence
    (`cp.offset(T)`); 0 otherwise."""
    prepared_mask: torch.Tensor | None = None
    """(B, 1, T, S) bool, True where a current token's softmax attention sees a key: the mask
    transformers' `create_masks_for_generate` prepares for a static cache, whose S key slots are
    fixed (the cache's length, filled or not). Attention then uses it as it is; None: attention
    derives its mask from `key_mask` and causality."""
    _bias: dict[tuple[int, int, torch.dtype], torch.Tensor] = field(
        default_factory=dict, repr=False
    )
    _span_mask: torch.Tensor | None = field(default=None, repr=False)
    _rotary: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )

    @classmethod
    def build(
        cls,
        attention_mask: torch.Tensor | Mapping[str, torch.Tensor | None] | None,
        position_ids: torch.Tensor | None,
        batch_size: int,
        seq_len: int,
        past_len: int | torch.Tensor,
        device: torch.device,
        cp: ContextParallel | None = None,
    ) -> MixerContext:
        """Positions and masks of `seq_len` current tokens after `past_len` cached ones.

        ``attention_mask``: the (B, S) padding mask of every token so far, or the per-layer-type
        masks transformers prepares for a static cache (see `_build_prepared`).

        Under context parallelism (`cp`: the current tokens are this rank's span of the whole
        sequence, no cache) the default positions are global, `cp.offset(seq_len)` + local
        position; `position_ids`, when given, must be the span's global positions already. An
        `attention_mask` with padding is refused there (every rank checks the whole group's
        masks, so all of them raise together instead of some waiting on the others): padding is
        what generation needs, and under context parallelism the zoo only trains, on packed rows.
        """
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2:
            raise ValueError(
                "attention_mask must be 2-D (batch, tokens), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        if cp is not None:
            if past_len:
                raise ValueError("context parallelism runs without a cache (past_len must be 0)")
            return cls._build_span(attention_mask, position_ids, batch_size, seq_len, device, cp)
        if isinstance(attention_mask, Mapping):
            return cls._build_prepared(
                attention_mask, position_ids, batch_size, seq_len, past_len, device
            )
        # An all-ones mask is no mask; checking reads its values, which a compiled step must not.
        if (
            attention_mask is not None
            and not torch.compiler.is_compiling()
            and bool(attention_mask.all())
        ):
            attention_mask = None
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
            else:
                position_ids = torch.arange(past_len, past_len + seq_len, device=device)
                position_ids = position_ids.expand(batch_size, seq_len)
        if attention_mask is None:
            return cls(position_ids=position_ids)
        key_mask = attention_mask.bool()
        return cls(position_ids=position_ids, token_mask=key_mask[:, -seq_len:], key_mask=key_mask)

    @classmethod
    def _build_prepared(
        cls,
        masks: Mapping[str, torch.Tensor | None],
        position_ids: torch.Tensor | None,
        batch_size: int,
        seq_len: int,
        past_len: int | torch.Tensor,
        device: torch.device,
    ) -> MixerContext:
        """From the masks transformers prepares per layer type for a compilable cache
        (`transformers.masking_utils.create_masks_for_generate`): "full_attention" (B, 1, T, S)
        bool or None, and for the recurrent layers "linear_attention" (B, T), the current
        tokens' padding, None where nothing is padded (always None for one decode token).

        Nothing here reads a tensor's values, so a compiled decode step has no host sync.
        ``past_len`` may be a 0-d tensor (a static cache's length)."""
        prepared = masks.get("full_attention")
        if prepared is not None and prepared.dim() != 4:
            raise ValueError(
                "attention_mask['full_attention'] must be a 4-D (batch, 1, tokens, keys) mask, "
                f"got shape {tuple(prepared.shape)}"
            )
        current = masks.get("linear_attention")
        token_mask = None if current is None else current[:, -seq_len:].bool()
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=device) + past_len
            position_ids = position_ids.expand(batch_size, seq_len)
        return cls(position_ids=position_ids, token_mask=token_mask, prepared_mask=prepared)

    @classmethod
    def _build_span(
        cls,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        batch_size: int,
        seq_len: int,
        device: torch.device,
        cp: ContextParallel,
    ) -> MixerContext:
        if attention_mask is not None:
            # All ranks agree before any raises (one of them alone would leave the others
            # waiting in the first layer's exchange).
            padded = torch.tensor([0.0 if bool(attention_mask.all()) else 1.0], device=device)
            dist.all_reduce(padded, op=dist.ReduceOp.MAX, group=cp.group)
            if padded.item():
                raise ValueError(
                    "context parallelism does not support padding: the attention_mask of some "
                    "span has zeros; pack documents into full rows instead (zoo.data), or "
                    "run the padded batch without context_parallel"
                )
        offset = cp.offset(seq_len)
        if position_ids is None:
            position_ids = torch.arange(offset, offset + seq_len, device=device)
            position_ids = position_ids.expand(batch_size, seq_len)
        return cls(position_ids=position_ids, cp=cp, offset=offset)

    def span_mask(self, device: torch.device) -> torch.Tensor:
        """Under context parallelism, the causal (T, offset + T) bool mask of this span's queries
        over the keys of the whole sequence up to the span's end: query i (global position
        offset + i) sees key j where j ≤ offset + i. Computed once per forward."""
        if self._span_mask is None:
            seq_len = self.position_ids.shape[1]
            q_pos = torch.arange(self.offset, self.offset + seq_len, device=device)[:, None]
            self._span_mask = torch.arange(self.offset + seq_len, device=device)[None] <= q_pos
        return self._span_mask

    def rotary(
        self,
        head_dim: int,
        base: float,
        dtype: torch.dtype,
        scaling: Mapping[str, Any] | None = None,
        max_position_embeddings: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin (B, T, head_dim) at `position_ids`, computed once per forward for each
        setting (`scaling`: transformers' `rope_parameters` of a scaled RoPE, see
        `zoo.layers.rotary`)."""
        setting = json.dumps(scaling, sort_keys=True) if scaling else None
        key = (head_dim, base, dtype, setting, max_position_embeddings if scaling else None)
        if key not in self._rotary:
            self._rotary[key] = rotary_cos_sin(
                self.position_ids, head_dim, base, dtype, scaling, max_position_embeddings
            )
        return self._rotary[key]

    def attention_bias(self, past_len: int, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive (B, 1, T, S) mask: causal within the keys, padded keys excluded.

        A finite minimum instead of -inf keeps fully masked rows (a left-padded query that sees
        only padding) finite: they become a uniform average, and their outputs are never used.
        """
        key = (past_len, kv_len, dtype)
        if key not in self._bias:
            assert self.key_mask is not None
            if self.key_mask.shape[1] != kv_len:
                raise ValueError(
                    f"attention_mask covers {self.key_mask.shape[1]} tokens but the attention "
                    f"layer sees {kv_len} (cache + current); pass the mask of the whole sequence"
                )
            seq_len = kv_len - past_len
            device = self.key_mask.device
            q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
            k_pos = torch.arange(kv_len, device=device)[None, :]
            allowed = (k_pos <= q_pos)[None] & self.key_mask[:, None, :]  # (B, T, S)
            bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
            bias.masked_fill_(~allowed, torch.finfo(dtype).min)
            self._bias[key] = bias.view(-1, 1, seq_len, kv_len)
        return self._bias[key]
