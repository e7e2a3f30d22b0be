"""Mixture-of-experts channel mixer: a top-k `Router`, stacked SwiGLU `Experts`, their losses.

    logits = W_r x                       (E scores per token, fp32)
    w, idx = top-k(softmax(logits) or sigmoid(logits)), optionally renormalised to sum to 1
    y      = Σ_j w_j · Expert_idx_j(x)  (+ shared experts, DeepSeekMoE)

The layout follows transformers' stacked-experts models (Mixtral, OLMoE, Qwen-MoE):
`gate.weight` [E, d], `experts.gate_up_proj` [E, 2f, d] (gate rows first, then up),
`experts.down_proj` [E, d, f], so a Mixtral checkpoint converts by renaming keys only.

The experts run on one of interchangeable backends, all the same function:
- `torch`: the reference. Sort the (token, slot) pairs by expert, run each expert on its
  contiguous block, weight, and un-permute (megablocks' indices-and-bins order).
- `torch_grouped_mm`: the same permutation, one `torch.nn.functional.grouped_mm` per projection.
- `triton`: zoo's Triton grouped GEMM (`zoo.kernels.grouped_gemm`; the torch reference off GPU).
- `megablocks`: megablocks' gather/scatter ops and grouped GEMM (GPU, `hybrid-zoo[megablocks]`).
Every backend function has transformers' experts signature `(experts, hidden_states,
top_k_index, top_k_weights)`, so it also runs transformers' own expert modules (see
`benchmarks/moe_layer.py`).

Dropless by default. With `moe_capacity_factor` set, a (token, slot) pair over its expert's
capacity is dropped: its index becomes the sentinel E and its weight 0, and every backend skips
sentinel rows (transformers' expert-parallel convention).

Expert parallelism (`zoo.parallel.expert`): once `enable_expert_parallel` has sharded a layer's
experts over a process group (`Experts.expert_group`), `Experts.forward` sends each pair to the
rank owning its expert and runs the backend there; the router drops over capacity and the
losses take their statistics on the group's global batch (their `group` argument).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from zoo.configuration import ZooConfig
from zoo.flops import linear_flops
from zoo.layers.glu import GLU
from zoo.parallel.expert import all_gather_rows, expert_parallel_forward, sum_over_ranks

ExpertsFunction = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Router(nn.Module):
    """Top-k router; `forward(x [T, d], token_mask [T] | None) -> (logits, weights, indices)`.

    `logits` [T, E] in x's dtype (what the aux losses and transformers' `router_logits` use),
    `weights` [T, k] fp32, `indices` [T, k] int64 (E marks a dropped pair when a capacity is set;
    padded tokens, token_mask False, are dropped too so they never take capacity). With an
    expert-parallel `group` the capacity drops are decided on the group's global batch.
    """

    def __init__(self, config: ZooConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.scoring_func = config.router_scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.capacity_factor = config.moe_capacity_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden_states, self.weight)
        scores = router_scores(logits, self.scoring_func)
        weights, indices = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.capacity_factor is not None:
            weights, indices = drop_over_capacity(
                weights, indices, self.num_experts, self.capacity_factor, token_mask, group
            )
        return logits, weights, indices


def router_scores(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """fp32 scores of each expert: a softmax over experts, or an independent sigmoid."""
    logits = logits.float()
    return logits.softmax(dim=-1) if scoring_func == "softmax" else logits.sigmoid()


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Pairs one expert takes per call: ceil(c · T · k / E) (Switch Transformer, GShard)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def drop_over_capacity(
    weights: torch.Tensor,
    indices: torch.Tensor,
    num_experts: int,
    capacity_factor: float,
    token_mask: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the pairs over each expert's capacity: first choices have priority over second
    choices (GShard), then earlier tokens over later ones. Dropped pairs get index E, weight 0.

    With an expert-parallel process `group`, the decisions are the ones one process makes on the
    concatenation of every rank's tokens in rank order: the [T, k] indices and the token mask
    are all-gathered, so the capacity counts the global tokens and each pair knows its place in
    its expert's global queue."""
    num_tokens, top_k = indices.shape
    if group is not None:
        mask = token_mask if token_mask is not None else indices.new_ones(num_tokens)
        local = torch.cat([indices, mask.reshape(-1, 1).long()], dim=1)  # [T, k + 1]
        everyone, start = all_gather_rows(local, group)  # [ΣT, k + 1]
        _, kept = drop_over_capacity(
            torch.ones(everyone[:, :top_k].shape, device=weights.device),
            everyone[:, :top_k],
            num_experts,
            capacity_factor,
            everyone[:, top_k].bool(),
        )
        kept = kept[start : start + num_tokens]  # [T, k]
        return weights.masked_fill(kept == num_experts, 0.0), kept
    if token_mask is not None:
        indices = indices.masked_fill(~token_mask.reshape(-1, 1), num_experts)
        num_tokens = int(token_mask.sum())
    capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    # Priority order: slot-major (all first choices, then all second choices, ...).
    by_slot = indices.t().reshape(-1)
    one_hot = F.one_hot(by_slot, num_experts + 1)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # place in its expert's queue
    keep = ((position < capacity) & (by_slot < num_experts)).view(top_k, -1).t()
    return weights.masked_fill(~keep, 0.0), indices.masked_fill(~keep, num_experts)


class Experts(nn.Module):
    """E SwiGLU experts in two stacked weights; transformers' `MixtralExperts` layout.

    `forward(hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k]) -> [T, d]`.
    `expert_group`: None, or the process group the experts are sharded over
    (`zoo.parallel.expert.shard_experts`: this rank then holds E/P of them, indices stay global).
    """

    def __init__(self, config: ZooConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        e, d, f = self.num_experts, self.hidden_dim, self.intermediate_dim
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))
        self.act_fn = nn.SiLU()
        self.backend = config.moe_backend
        check_moe_backend(self.backend)
        self.expert_group: dist.ProcessGroup | None = None

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return _routed_experts(self, hidden_states, top_k_index, top_k_weights)


# torch.compile's escape for routing: how many pairs each expert gets is data, so the grouped
# GEMMs' shapes are too (and CPU fp32 grouped_mm has no meta kernel to trace). dynamo runs this
# function eagerly, a graph break at the experts only; the router, the mixers and everything
# else in the block stay in the graph.
@torch.compiler.disable
def _routed_experts(
    experts: Experts,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    if experts.expert_group is not None:
        backend = EXPERTS_BACKENDS[resolve_moe_backend(experts.backend)]
        return expert_parallel_forward(experts, hidden_states, top_k_index, top_k_weights, backend)
    return experts_forward(experts, hidden_states, top_k_index, top_k_weights, experts.backend)


class MoE(nn.Module):
    """The channel mixer: router, routed experts, optional shared experts.

    `forward(x [B, T, d], token_mask [B, T] | None) -> (y [B, T, d], router_logits [B·T, E])`.
    """

    def __init__(self, config: ZooConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (
            GLU(config, "silu", config.num_shared_experts * config.moe_intermediate_size)
            if config.num_shared_experts
            else None
        )

    def flops_per_token(self, seq_len: int) -> int:
        """Router (2 · d · E), the k active experts (2 · 3 · d · f each), shared experts."""
        experts = self.experts
        per_expert = 2 * (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel())
        router = 2 * self.gate.weight.numel()
        return router + self.gate.top_k * per_expert + linear_flops(self.shared_experts)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        mask = token_mask.reshape(-1) if token_mask is not None else None
        router_logits, weights, indices = self.gate(flat, mask, self.experts.expert_group)
        out = self.experts(flat, indices, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape), router_logits


# ---------------------------------------------------------------------------------------------
# Backends. Each takes an experts module with `gate_up_proj` [E, 2f, d], `down_proj` [E, d, f],
# `act_fn` and `num_experts` (ours or transformers' own) and returns [T, d] in x's dtype.


def check_moe_backend(backend: str) -> None:
    """Raise a clear error now if `backend` cannot run in this install (not at first forward)."""
    if backend not in EXPERTS_BACKENDS and backend != "auto":
        raise ValueError(f"moe_backend={backend!r} is not one of {['auto', *EXPERTS_BACKENDS]}")
    if backend == "megablocks" and importlib.util.find_spec("megablocks") is None:
        raise ImportError(
            "moe_backend='megablocks' needs the megablocks package (GPU only): "
            "pip install 'hybrid-zoo[megablocks]', or use moe_backend='torch_grouped_mm'"
        )


def resolve_moe_backend(backend: str) -> str:
    """ "auto" → `torch_grouped_mm` where torch has it, else `torch`."""
    if backend != "auto":
        return backend
    return "torch_grouped_mm" if _grouped_mm is not None else "torch"


def experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Run `experts` on the routed tokens with `backend` (see the module docstring)."""
    check_moe_backend(backend)
    fn = EXPERTS_BACKENDS[resolve_moe_backend(backend)]
    return fn(experts, hidden_states, top_k_index, top_k_weights)


def sort_by_expert(
    top_k_index: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megablocks' indices-and-bins: `order` sorts the flat (token, slot) pairs by expert
    (sentinel pairs last), `tokens` is the token of each sorted pair, `counts` [E] the pairs per
    expert (histc ignores the sentinel E and needs no device-to-host sync)."""
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = order // top_k_index.shape[-1]
    histc_input = flat.float() if flat.device.type in ("cpu", "mps") else flat.int()
    counts = torch.histc(histc_input, bins=num_experts, min=0, max=num_experts - 1)
    return order, tokens, counts.to(torch.int32)


def _unpermute(
    expert_out: torch.Tensor,
    order: torch.Tensor,
    top_k_weights: torch.Tensor,
    invalid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows back to (token, slot) order and the weighted sum over slots: one batched matmul,
    deterministic (no atomics) and accumulated in fp32 when the weights are fp32. `invalid`
    [S, 1] marks sentinel rows, which a grouped GEMM leaves unwritten: they are zeroed."""
    num_tokens, top_k = top_k_weights.shape
    if invalid is not None:
        expert_out = expert_out.masked_fill(invalid, 0.0)
    unsorted = torch.empty_like(expert_out).index_copy(0, order, expert_out)
    weights = top_k_weights.to(expert_out.dtype).unsqueeze(1)  # [T, 1, k]
    return torch.bmm(weights, unsorted.view(num_tokens, top_k, -1)).squeeze(1)


def _sentinel_rows(top_k_index: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor | None:
    """[S, 1] True at sorted rows past the last expert's block (dropped pairs), or None when
    nothing was dropped. Such rows are zeroed on the way in, so that the gradient a grouped GEMM
    leaves unwritten there never reaches the input, and on the way out."""
    if not bool((top_k_index >= offsets.numel()).any()):
        return None
    rows = torch.arange(top_k_index.numel(), device=top_k_index.device)
    return (rows >= offsets[-1]).unsqueeze(-1)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of a [S, 2f] gate_up projection, with a backward that writes both halves
    of the gradient into one [S, 2f] buffer (autograd's chunk would allocate each half and
    concatenate them) and saves only the projection, not silu(gate)."""

    @staticmethod
    def forward(ctx: Any, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.ops.aten.silu.out(gate, out=grad_up)
        grad_up.mul_(grad)  # d/d up = grad · silu(gate)
        torch.mul(grad, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_gate_up


def swiglu(gate_up: torch.Tensor, act_fn: nn.Module | None = None) -> torch.Tensor:
    """act(gate) * up for the [S, 2f] output of a stacked gate_up projection (gate rows first).
    SiLU (the zoo's experts, Mixtral's) takes the fused path; any other act_fn the plain one."""
    if act_fn is None or isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
        return _SwiGLU.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up


def torch_experts(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference: sort by expert, loop over experts on contiguous blocks, un-permute."""
    num_experts = experts.num_experts
    order, tokens, counts = sort_by_expert(top_k_index, num_experts)
    x = hidden_states.index_select(0, tokens)
    sizes = counts.tolist()
    num_valid = sum(sizes)
    outputs = []
    for e, block in enumerate(x[:num_valid].split(sizes)):
        if block.shape[0] == 0:
            continue
        gate, up = F.linear(block, experts.gate_up_proj[e]).chunk(2, dim=-1)
        outputs.append(F.linear(experts.act_fn(gate) * up, experts.down_proj[e]))
    dropped = x.shape[0] - num_valid
    if dropped:
        outputs.append(x.new_zeros(dropped, x.shape[-1]))
    expert_out = torch.cat(outputs) if outputs else torch.zeros_like(x)
    out = _unpermute(expert_out, order, top_k_weights)
    return out.to(hidden_states.dtype)


_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_experts(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gemm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Sort by expert, `gemm(x, w, offsets)` = x_e @ w[e]ᵀ for each expert's block of rows
    (no host sync, no Python loop), SwiGLU, the down projection, un-permute."""
    num_experts = experts.num_experts
    order, tokens, counts = sort_by_expert(top_k_index, num_experts)
    offsets = counts.cumsum(0, dtype=torch.int32)
    w_gate_up, w_down = experts.gate_up_proj, experts.down_proj
    x = hidden_states.index_select(0, tokens).to(w_gate_up.dtype)
    invalid = _sentinel_rows(top_k_index, offsets)
    if invalid is not None:
        x = x.masked_fill(invalid, 0.0)
    hidden = swiglu(gemm(x, w_gate_up, offsets), experts.act_fn)
    expert_out = gemm(hidden, w_down, offsets)
    out = _unpermute(expert_out, order, top_k_weights, invalid)
    return out.to(hidden_states.dtype)


def _torch_grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _grouped_mm(x, w.transpose(-2, -1), offs=offsets)


def grouped_mm_experts(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The torch reference's permutation, one `torch.nn.functional.grouped_mm` per projection."""
    if _grouped_mm is None:
        raise NotImplementedError(
            f"torch {torch.__version__} has no grouped_mm; use moe_backend='torch'"
        )
    return _grouped_experts(experts, hidden_states, top_k_index, top_k_weights, _torch_grouped_gemm)


def triton_experts(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The same with zoo's Triton grouped GEMM."""
    from zoo.kernels.grouped_gemm import grouped_gemm  # imported on use: triton loads lazily

    def gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return grouped_gemm(x, w, offsets, trans_b=True)

    return _grouped_experts(experts, hidden_states, top_k_index, top_k_weights, gemm)


def megablocks_experts(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """megablocks' dMoE path (ops.sort/histogram/gather/scatter + grouped_gemm's gmm), dropless."""
    import megablocks.ops as mb_ops  # the optional extra
    from megablocks import grouped_gemm_util as gg

    num_experts = experts.num_experts
    top_k = top_k_index.shape[-1]
    if bool((top_k_index >= num_experts).any()):
        raise ValueError("moe_backend='megablocks' is dropless: set moe_capacity_factor=None")
    flat = top_k_index.reshape(-1).int()
    end_bit = max(math.ceil(math.log2(num_experts)), 1)
    with torch.no_grad():
        bin_ids, indices = mb_ops.sort(flat, end_bit)
        tokens_per_expert = mb_ops.histogram(flat, num_experts)
        bins = mb_ops.inclusive_cumsum(tokens_per_expert, 0).view(-1)
    batch_sizes = tokens_per_expert.cpu().to(torch.long)
    w_gate_up, w_down = experts.gate_up_proj, experts.down_proj
    x = mb_ops.gather(hidden_states.to(w_gate_up.dtype), indices, bin_ids, bins, top_k)
    hidden = swiglu(gg.ops.gmm(x, w_gate_up, batch_sizes, trans_b=True), experts.act_fn)
    x = gg.ops.gmm(hidden, w_down, batch_sizes, trans_b=True)
    weights = top_k_weights.reshape(-1).to(x.dtype)
    out = mb_ops.scatter(x, indices, bin_ids, weights, bins, top_k)
    return out.to(hidden_states.dtype)


EXPERTS_BACKENDS: dict[str, ExpertsFunction] = {
    "torch": torch_experts,
    "torch_grouped_mm": grouped_mm_experts,
    "triton": triton_experts,
    "megablocks": megablocks_experts,
}

# Name under which transformers' own MoE models (Mixtral, OLMoE, Qwen-MoE, ...) can run their
# experts on our Triton grouped GEMM: `from_pretrained(..., experts_implementation=...)`.
EXPERTS_IMPLEMENTATION = "zoo_grouped_gemm"


def transformers_experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' `ExpertsInterface` signature over `triton_experts`, for the stacked
    gate-up / down layout without biases (what Mixtral, OLMoE and Qwen-MoE use)."""
    layout = (
        getattr(experts, "has_bias", False),
        getattr(experts, "is_transposed", False),
        not getattr(experts, "has_gate", True),
        not getattr(experts, "is_concatenated", True),
        getattr(experts, "_is_expert_parallel", False),
    )
    if any(layout):
        raise NotImplementedError(
            f"experts_implementation={EXPERTS_IMPLEMENTATION!r} supports concatenated gate_up "
            f"[E, 2f, d] and down [E, d, f] weights without biases, not {type(experts).__name__}"
        )
    return triton_experts(experts, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> None:
    """Make `experts_implementation="zoo_grouped_gemm"` valid for transformers' MoE models."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, transformers_experts_forward)


register_experts_implementation()


# ---------------------------------------------------------------------------------------------
# Losses and load statistics over the router logits of the MoE layers of one forward.


def _masked_rows(logits: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    return logits if token_mask is None else logits[token_mask.reshape(-1).bool()]


def expert_load(
    router_logits: Sequence[torch.Tensor], top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[layers, E] fraction of the (token, slot) pairs each expert is chosen for (rows sum to 1);
    padded tokens (token_mask False) are left out. Capacity drops are not subtracted."""
    loads = []
    for logits in router_logits:
        logits = _masked_rows(logits.detach(), token_mask)
        num_experts = logits.shape[-1]
        chosen = logits.float().topk(top_k, dim=-1).indices.reshape(-1)
        counts = torch.bincount(chosen, minlength=num_experts).float()
        loads.append(counts / counts.sum().clamp(min=1))
    return torch.stack(loads)


def load_imbalance(load: torch.Tensor) -> torch.Tensor:
    """max/mean expert load per layer (1.0 = perfectly balanced, E/k = one expert set takes all)."""
    return load.max(dim=-1).values / load.mean(dim=-1)


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    top_k: int,
    scoring_func: str = "softmax",
    token_mask: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Switch Transformer's loss E · Σ_i f_i P_i per MoE layer, averaged over layers.

    f_i = pairs routed to expert i per token (sums to k), P_i = mean normalised score of
    expert i. It is k for a uniform router and grows as routing concentrates. For one layer it
    equals transformers' `load_balancing_loss_func` (which pools the layers before the product).

    With a process `group` (expert or data parallel), the counts, token counts and summed
    scores are summed over its ranks: every rank gets the loss of one process on the
    concatenated batch, and its backward the gradient of that loss with respect to its own
    logits, so the router's gradients summed over ranks are the one-process gradient (the SUM
    convention of `zoo.parallel.expert`).
    """
    stats, prob_sums = [], []
    for logits in router_logits:
        logits = _masked_rows(logits, token_mask)
        num_experts = logits.shape[-1]
        scores = router_scores(logits, scoring_func)
        probs = scores / scores.sum(dim=-1, keepdim=True)
        chosen = scores.topk(top_k, dim=-1).indices
        counts = torch.zeros(num_experts + 1, device=logits.device, dtype=torch.float32)
        counts = counts.index_add(0, chosen.reshape(-1), counts.new_ones(chosen.numel()))
        counts[-1] = logits.shape[0]
        stats.append(counts)  # [E + 1]: pairs per expert, then the tokens
        prob_sums.append(probs.sum(dim=0))  # [E]
    counts, prob_sum = torch.stack(stats), torch.stack(prob_sums)  # [layers, E + 1], [layers, E]
    if group is not None:
        counts, prob_sum = sum_over_ranks(counts, group), sum_over_ranks(prob_sum, group)
    rows = counts[:, -1:].clamp(min=1)  # [layers, 1]
    losses = prob_sum.shape[-1] * torch.sum(counts[:, :-1] / rows * (prob_sum / rows), dim=-1)
    return losses.mean()


def router_z_loss(
    router_logits: Sequence[torch.Tensor],
    token_mask: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)², averaged over layers; keeps the
    router logits small, which keeps the softmax (and bf16 training) stable. With a process
    `group`, the mean is over the tokens of all its ranks, with `load_balancing_loss`'s
    gradient convention."""
    sums, rows = [], []
    for logits in router_logits:
        logits = _masked_rows(logits, token_mask).float()
        sums.append(logits.logsumexp(dim=-1).square().sum())
        rows.append(logits.shape[0])
    total = torch.stack(sums)  # [layers]
    rows = total.new_tensor(rows)  # [layers]
    if group is not None:
        total, rows = sum_over_ranks(total, group), sum_over_ranks(rows, group)
    return (total / rows).mean()


def router_losses(
    router_logits: Sequence[torch.Tensor],
    config: ZooConfig,
    token_mask: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, its weighted sum with the z-loss): what every training loss of a
    MoE model adds, `router_aux_loss_coef` × aux + `router_z_loss_coef` × z; with a process
    `group`, both on the group's global batch (see `load_balancing_loss`)."""
    aux = load_balancing_loss(
        router_logits, config.num_experts_per_tok, config.router_scoring_func, token_mask, group
    )
    z = router_z_loss(router_logits, token_mask, group)
    return aux, config.router_aux_loss_coef * aux + config.router_z_loss_coef * z
