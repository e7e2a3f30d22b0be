"""Expert parallelism (EP) for the MoE channel mixer: the E experts of every MoE layer sharded
over a process group of P ranks, rank r holding experts [r·E/P, (r+1)·E/P).

Every rank routes its own tokens with the replicated router, then, per MoE layer:

    counts    [E]        pairs this rank sends to each expert; all-to-all → pairs it receives
    dispatch  [S, d]     its kept (token, slot) rows, sorted by expert, hence by owning rank;
                         all-to-all with those variable splits → [R, d] for its own experts
    compute   [R, d]     the local experts on the received rows, with the layer's experts backend
    return    [S, d]     the reverse all-to-all
    combine   [T, d]     y_t = Σ_j w_tj · result_tj (dropped pairs count 0)

Dropless unless a capacity is set; then the drop decisions are the ones one process makes on the
concatenation of every rank's tokens in rank order (`zoo.layers.moe.drop_over_capacity` with a
group all-gathers the [T, k] indices: its capacity comes from the global token count).

Gradient convention: SUM. Rank r's objective is its share of the global loss (its tokens' terms
of the one-process loss on the concatenated batch) plus the router losses, which every rank
computes on the global batch (`sum_over_ranks`: each rank holds the same value, and its backward
reaches only its own tokens). The gradients then add up to the one-process gradient:
- replicated parameters (router, attention, norms, ...): sum the gradients over all ranks;
- expert weights: autograd's reverse all-to-alls already bring every rank's gradient to the
  rank that owns the expert, so rank r's expert gradient is the full one-process gradient of
  its experts; sum them only over data-parallel replicas holding the same experts (none when
  the EP group is the whole world). `expert_parameter_names` says which parameters these are.
Under DDP's mean instead (each of the N data ranks backpropagates the mean loss of its own
tokens, N times its share, and gradients are averaged over ranks), multiply the router losses by
N and divide the expert gradients, averaged over the replicas of the same experts, by P too.

`zoo.parallel` sits below `zoo.layers`: nothing here imports the MoE layer. `enable_expert_parallel`
finds MoE layers by their shape (a `gate` and an `experts` with stacked weights and an
`expert_group` attribute) and the layer's forward calls `expert_parallel_forward` with its
experts backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ExpertsFunction = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


class _SumOverRanks(torch.autograd.Function):
    """Σ over the ranks of `group` forward; the identity backward (see `sum_over_ranks`)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def sum_over_ranks(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """s = Σ_r tensor_r on every rank, differentiable under the SUM convention: every rank holds
    the same global loss L(s), and rank r's backward gives ∂L/∂tensor_r = ∂L/∂s (the identity,
    not a second all-reduce), the exact gradient of the one-process loss with respect to its own
    summand. Summing the parameter gradients over ranks then gives the one-process gradient."""
    return _SumOverRanks.apply(tensor, group)


def all_gather_rows(tensor: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, int]:
    """(the [Σ_r T_r, ...] concatenation of every rank's [T_r, ...] tensor in rank order, the row
    where this rank's rows start). Ranks may hold different T_r. Not differentiable."""
    size = dist.get_world_size(group)
    rows = torch.tensor([tensor.shape[0]], device=tensor.device)
    all_rows = [torch.empty_like(rows) for _ in range(size)]
    dist.all_gather(all_rows, rows, group=group)
    counts = [int(n) for n in all_rows]
    padded = tensor.new_zeros(max(counts), *tensor.shape[1:])  # all_gather needs equal shapes
    padded[: tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(pieces, padded, group=group)
    start = sum(counts[: dist.get_rank(group)])
    return torch.cat([piece[:n] for piece, n in zip(pieces, counts, strict=True)]), start


def shard_experts(experts: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Keep only this rank's slice [r·E/P, (r+1)·E/P) of the stacked `gate_up_proj` [E, 2f, d] and
    `down_proj` [E, d, f], in place (the same Parameters, new data [E/P, ...]), and mark the
    module with `expert_group`. `experts.num_experts` stays E, the routed count. Weights that
    another layer shares (one Parameter) are sliced once. `group`: default the whole world."""
    group = group if group is not None else dist.group.WORLD
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    num_experts = experts.num_experts
    if num_experts % size:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the expert-parallel size {size}"
        )
    local = num_experts // size
    for name in EXPERT_WEIGHTS:
        param = getattr(experts, name)
        if param.shape[0] == num_experts:  # not yet sliced through a module sharing it
            param.data = param.data[rank * local : (rank + 1) * local].clone()
    experts.expert_group = group


def expert_parallel_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    experts_fn: ExpertsFunction,
) -> torch.Tensor:
    """y [T, d] of this rank's tokens through experts sharded over `experts.expert_group`.

    `top_k_index` [T, k] holds global expert ids (E marks a dropped pair), `top_k_weights` [T, k]
    the routing weights; `experts_fn(local, x [R, d], index [R, 1], weights [R, 1])` is one of
    the experts backends, run on the received rows with local expert ids and weight 1. Every
    rank of the group must call this together (once per MoE layer, forward and backward).
    """
    from torch.distributed._functional_collectives import all_to_all_single_autograd  # on use

    group = experts.expert_group
    size = dist.get_world_size(group)
    w_gate_up, w_down = experts.gate_up_proj, experts.down_proj
    num_local = w_gate_up.shape[0]
    num_experts = num_local * size
    num_tokens, top_k = top_k_index.shape
    dim = hidden_states.shape[-1]

    # The kept (token, slot) pairs sorted by expert, so by owning rank; dropped pairs last.
    flat = top_k_index.reshape(-1)  # [T·k]
    order = torch.argsort(flat, stable=True)  # [T·k]
    send_counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]  # [E]
    recv_counts = torch.empty_like(send_counts)  # [P·E/P]: from rank s, for local expert e
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits = send_counts.view(size, num_local).sum(dim=1).tolist()
    recv_splits = recv_counts.view(size, num_local).sum(dim=1).tolist()
    kept = order[: sum(send_splits)]  # [S]
    send_x = hidden_states.index_select(0, kept // top_k)  # [S, d]
    recv_x = all_to_all_single_autograd(send_x, recv_splits, send_splits, group)  # [R, d]

    local = SimpleNamespace(
        num_experts=num_local, gate_up_proj=w_gate_up, down_proj=w_down, act_fn=experts.act_fn
    )
    if recv_x.shape[0]:
        # Rank s sent its rows for local expert 0, then 1, ...: the local id of each row.
        local_index = torch.arange(num_local, device=flat.device).repeat(size)  # [P·E/P]
        local_index = local_index.repeat_interleave(recv_counts).unsqueeze(-1)  # [R, 1]
        ones = torch.ones(local_index.shape, device=flat.device)  # [R, 1]
        recv_y = experts_fn(local, recv_x, local_index, ones)  # [R, d]
    else:
        # No pair for this rank's experts: the projections of no rows keep recv_x and the
        # weights in the graph, so this rank joins the backward all-to-alls like the others.
        gate = F.linear(recv_x, w_gate_up[0]).narrow(-1, 0, w_down.shape[-1])  # [0, f]
        recv_y = F.linear(gate, w_down[0])  # [0, d]
    send_y = all_to_all_single_autograd(recv_y, send_splits, recv_splits, group)  # [S, d]

    pairs = send_y.new_zeros(num_tokens * top_k, dim).index_copy(0, kept, send_y)  # [T·k, d]
    weights = top_k_weights.to(pairs.dtype).unsqueeze(1)  # [T, 1, k]
    out = torch.bmm(weights, pairs.view(num_tokens, top_k, dim)).squeeze(1)  # [T, d]
    return out.to(hidden_states.dtype)


def _moe_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, experts module) of every MoE layer: a module with a `gate` and `experts` whose
    experts hold stacked weights and the `expert_group` hook; shared modules under each name."""
    for name, module in model.named_modules(remove_duplicate=False):
        experts = getattr(module, "experts", None)
        if (
            hasattr(module, "gate")
            and hasattr(experts, "expert_group")
            and all(hasattr(experts, w) for w in EXPERT_WEIGHTS)
        ):
            yield f"{name}.experts" if name else "experts", experts


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The experts modules of `model`'s MoE layers, each once (a shared one too)."""
    unique: dict[int, nn.Module] = {}
    for _, experts in _moe_experts(model):
        unique.setdefault(id(experts), experts)
    return list(unique.values())


def enable_expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Shard the experts of every MoE layer of `model` over `group` (default: the whole world);
    from then on their forward runs expert-parallel. Every rank must build the same model (same
    weights) and call this, then train with the SUM convention of this module's docstring."""
    layers = list(_moe_experts(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer to shard")
    for _, experts in layers:
        shard_experts(experts, group)


def expert_parallel_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The expert-parallel group of `model`'s MoE layers, None when none is sharded: what the
    router losses take (`zoo.layers.moe.router_losses(..., group=)`) to be global."""
    groups = {
        id(e.expert_group): e.expert_group
        for _, e in _moe_experts(model)
        if e.expert_group is not None
    }
    if len(groups) > 1:
        raise ValueError(f"{type(model).__name__}'s MoE layers use different expert groups")
    return next(iter(groups.values()), None)


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names (as `model.named_parameters()` gives them) of the expert-sharded parameters: their
    gradients are summed only over the data-parallel ranks holding the same experts; every other
    parameter's over all ranks."""
    sharded = {
        id(getattr(experts, w))
        for _, experts in _moe_experts(model)
        if experts.expert_group is not None
        for w in EXPERT_WEIGHTS
    }
    return [name for name, param in model.named_parameters() if id(param) in sharded]


def whole_expert_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every sharded expert weight all-gathered back to [E, ...], by its name in
    `model.state_dict()` (each name of a weight shared by layers). A weight that FSDP shards
    too (`zoo.parallel.fsdp`: a DTensor over the ranks holding the same experts) is first made
    whole there. Every rank of each expert group must call it."""
    from torch.distributed.tensor import DTensor

    whole: dict[str, torch.Tensor] = {}
    gathered: dict[int, torch.Tensor] = {}
    for name, experts in _moe_experts(model):
        group = experts.expert_group
        if group is None:
            continue
        for w in EXPERT_WEIGHTS:
            param = getattr(experts, w)
            if id(param) not in gathered:
                shard = param.full_tensor() if isinstance(param, DTensor) else param.detach()
                pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
                dist.all_gather(pieces, shard.contiguous(), group=group)
                gathered[id(param)] = torch.cat(pieces)  # [E, ...]
            whole[f"{name}.{w}"] = gathered[id(param)]
    return whole


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every sharded expert weight all-gathered back to [E, ...]: what
    `save_pretrained(..., state_dict=)` writes so the checkpoint loads in one process. Every rank
    of each expert group must call it; a weight shared by layers stays one tensor."""
    return {**model.state_dict(), **whole_expert_weights(model)}
