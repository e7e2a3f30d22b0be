"""FLOPs per token of every mixer, channel mixer and whole model: for MFU and the scaling tools.

Conventions (the ones Chinchilla, PaLM and the linear-complexity scaling-law paper use):

* A multiply-add is 2 FLOPs; a token-wise `nn.Linear` costs 2 · in · out per token.
* Training costs 3 × the forward pass (the backward pass is 2 ×), so train FLOPs per token
  = 6 · (matmul parameters) + 3 · (the sequence-mixing terms below).
* Softmax attention's score and value products cost 2 · 2 · T · d_attn per token at context
  T, counted over the full context as PaLM's 6N + 12·l·d·T does (a causal kernel skips about
  half of it; MFU stays comparable with the literature this way).
* Recurrent mixers are counted in their recurrent form (state update and read-out per token),
  which does not depend on T; the chunked training form does about the same work.
* Elementwise work (norms, activations, gates, softmax) is left out: it is a few percent at
  these widths and is not matmul-unit work.
* Embedding lookups are free; the LM head costs 2 · d · V. (The scaling-law paper, arXiv
  2406.16690 App. A.1, also counts the input embedding as a one-hot matmul, 12·d·V per trained
  token in all; `FlopsReport.embedding` holds that 2 · d · V for whoever wants its convention:
  with it, our TNL/HGRN2/cosFormer2 counts match the paper's formulas within 1%.) MoE layers
  count the router and the k active experts only, so FLOPs follow active parameters.

Each mixer states its own count in `flops_per_token(seq_len)` (forward FLOPs per token).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def linear_flops(*modules: nn.Module | None) -> int:
    """Forward FLOPs per token of the token-wise `nn.Linear` layers in `modules` (2 per
    multiply-add of the weight; biases are negligible)."""
    return sum(
        2 * layer.weight.numel()
        for module in modules
        if module is not None
        for layer in module.modules()
        if isinstance(layer, nn.Linear)
    )


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs per token of one model at one context length."""

    seq_len: int
    forward_per_token: int
    """Forward FLOPs per token: blocks + LM head."""
    mixers: tuple[int, ...]
    """Forward FLOPs per token of each layer's sequence mixer."""
    channel_mixers: tuple[int, ...]
    """Forward FLOPs per token of each layer's channel mixer (active experts only)."""
    lm_head: int
    embedding: int
    """2 · d · V: the input embedding as a matmul; not in `forward_per_token` (see above)."""

    @property
    def train_per_token(self) -> int:
        """Forward + backward (3 × forward): what MFU and C = FLOPs/token × D use."""
        return 3 * self.forward_per_token


def model_flops(model: nn.Module, seq_len: int) -> FlopsReport:
    """FLOPs per token of a zoo causal LM (or base model) at context `seq_len`.

    Works on a model built on the meta device, so paper-scale configs cost nothing to count.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    base = getattr(model, "model", model)
    mixers = tuple(block.mixer.flops_per_token(seq_len) for block in base.layers)
    channels = tuple(
        block.channel_mixer.flops_per_token(seq_len) if block.channel_mixer is not None else 0
        for block in base.layers
    )
    head = getattr(model, "lm_head", None)
    lm_head = linear_flops(head)
    return FlopsReport(
        seq_len=seq_len,
        forward_per_token=sum(mixers) + sum(channels) + lm_head,
        mixers=mixers,
        channel_mixers=channels,
        lm_head=lm_head,
        embedding=2 * base.embed_tokens.weight.numel(),
    )
