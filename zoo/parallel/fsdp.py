"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on a run's mesh: parameters, gradients and
optimizer state sharded over dp_shard × cp ranks, replicated over dp_replicate (HSDP).

    model = apply_fsdp(model, mesh, precision="bf16")   # before the optimizer is built
    optimizer = torch.optim.AdamW(model.parameters(), ...)

One FSDP unit per block (`model.model.layers[i]`, or `model.layers[i]` for a bare backbone)
and one for the root (embeddings, final norm, LM head and the parameters the model holds for
all its layers), so at most a block's parameters are gathered at a time. Blocks that share
parameters with another block (a STAR export's `mixer_weight_source`) stay in the root unit:
a parameter belongs to one unit, and the root's stay gathered for the whole step.

After `apply_fsdp` every parameter is a `DTensor` sharded on dim 0 (`Shard(0)` on the
"dp_shard_cp" dim; `(Replicate(), Shard(0))` on ("dp_replicate", "dp_shard_cp") for HSDP).
Gradients are reduce-scattered on every backward (gradient accumulation keeps them sharded)
and averaged over all ranks.

With expert parallelism (`zoo.parallel.expert`, ep > 1) each MoE layer's experts are first
sharded over the expert-parallel group (rank j of it holds E/ep of them), then `fully_shard`ed
on their own mesh, the "ep_dp" ranks that hold the same experts, as torchtitan does. The
all-to-alls already bring every expert-parallel rank's contribution to the expert's owner (the
SUM convention), so their gradient, which FSDP averages over the ep_dp ranks, is divided by ep
once more (`expert_gradients_to_mean`, after the backward: FSDP2's own divide factor needs a
PREMUL_SUM reduction, which gloo lacks): every parameter's gradient is then the mean over the
world's ranks, as without experts. Under
context parallelism the trainer scales each rank's loss by cp (`zoo.training`), since a rank's
backward is its span's share of the sequence's loss.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.parallel.mesh import Mesh

_PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision(precision: str, device_type: str) -> torch.dtype | None:
    """The dtype FSDP gathers parameters in for the forward and backward: the recipe's
    `training.precision` on CUDA (bf16 or fp16; weights, optimizer state and the gradient
    reduction stay fp32), None (fp32) for fp32 and on every other device (gloo on the CPU
    reduces fp32)."""
    if device_type != "cuda":
        return None
    return _PARAM_DTYPES.get(precision)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM (`model.model.layers`) or a backbone (`.layers`)."""
    backbone = getattr(model, "model", model)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no model.layers: FSDP wraps one unit per block"
        )
    return layers


def _shared_blocks(blocks: nn.ModuleList) -> set[int]:
    """Indices of the blocks holding a parameter that another block holds too."""
    owners: dict[int, set[int]] = {}
    for i, block in enumerate(blocks):
        for param in block.parameters():
            owners.setdefault(id(param), set()).add(i)
    return {i for found in owners.values() if len(found) > 1 for i in found}


def apply_fsdp(model: nn.Module, mesh: Mesh, precision: str = "fp32") -> nn.Module:
    """Shard `model` in place with `fully_shard` on `mesh.fsdp_mesh` (see the module
    docstring) and return it. The model must be on the mesh's device; build the optimizer
    afterwards, over the sharded parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    param_dtype = mixed_precision(precision, mesh.device_mesh.device_type)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if mesh.sizes.ep > 1:
        from torch.distributed.device_mesh import DeviceMesh

        from zoo.parallel.expert import enable_expert_parallel, expert_modules

        enable_expert_parallel(model, mesh.groups["ep"])
        ep_dp = DeviceMesh.from_group(mesh.groups["ep_dp"], mesh.device_mesh.device_type)
        for experts in expert_modules(model):
            fully_shard(experts, mesh=ep_dp, mp_policy=policy)
    blocks = blocks_of(model)
    shared = _shared_blocks(blocks)
    for i, block in enumerate(blocks):
        if i not in shared:
            fully_shard(block, mesh=mesh.fsdp_mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh.fsdp_mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `apply_fsdp` (or any `fully_shard`) sharded `model`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def expert_gradients_to_mean(model: nn.Module, mesh: Mesh) -> None:
    """Divide the expert weights' gradients by ep (see the module docstring); call once per
    optimizer step, after the last backward. Nothing to do without expert parallelism."""
    if mesh.sizes.ep == 1:
        return
    from zoo.parallel.expert import expert_parameter_names

    params = dict(model.named_parameters())
    for name in expert_parameter_names(model):
        if params[name].grad is not None:
            params[name].grad.div_(mesh.sizes.ep)


def clip_grad_norm(model: nn.Module, max_norm: float, mesh: Mesh) -> torch.Tensor:
    """Clip every gradient of a model sharded by `apply_fsdp` by the norm of all of them, and
    return that norm: the dense parameters' norm over their mesh, plus, with expert
    parallelism, the experts' (each expert-parallel rank holds other experts: their squared
    norms add over the "ep" group)."""
    from torch.distributed.tensor import DTensor

    from zoo.parallel.expert import expert_parameter_names

    experts = set(expert_parameter_names(model)) if mesh.sizes.ep > 1 else set()
    dense, routed = [], []
    for name, param in model.named_parameters():
        if param.grad is not None:
            (routed if name in experts else dense).append(param)

    def squared(params: list[nn.Parameter]) -> torch.Tensor:
        if not params:
            return torch.zeros((), device=mesh.device_mesh.device_type)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        return norm.float() ** 2

    total = squared(dense)
    if mesh.sizes.ep > 1:
        routed_sq = squared(routed)
        torch.distributed.all_reduce(routed_sq, group=mesh.groups["ep"])
        total = total + routed_sq
    norm = total.sqrt()
    for params in (dense, routed):  # apart: one foreach cannot mix DTensors of two meshes
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
