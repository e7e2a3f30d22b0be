"""The device mesh of a run: how its processes split into data-parallel replicas, FSDP shards,
context-parallel spans and expert-parallel groups, and the process groups each part talks over.

The sizes are the recipe's `parallel:` keys (accelerate's `ParallelismConfig` names where it has
them, plus `ep_size`):

    dp_replicate × dp_shard × cp = world size
    ep divides dp_shard × cp     (expert parallelism borrows ranks from those two dims)

Ranks are laid out row-major over ("dp_replicate", "dp_shard", "cp"), context parallelism
innermost (its exchanges are the most frequent, so its ranks are neighbours, on one machine):

    rank = (r · dp_shard + s) · cp + c

Over that layout, each rank belongs to one group of each kind (`rank_groups`):

- `dp`: the ranks that read *different* batches (same c): dp_replicate × dp_shard of them; a
  rank's index in it is its data rank (`data_rank`). The ranks of one `cp` group share a batch.
- `cp`: the ranks that split one sequence (same r, s), in span order.
- `dp_shard_cp`: the ranks FSDP shards parameters over (same r): dp_shard × cp of them, as
  torchtitan does: the context-parallel ranks hold parameter shards too.
- `dp_replicate`: the ranks holding the same shard (same s, c): HSDP's replicas.
- `ep`: the ranks that split the experts of a MoE layer (same r, consecutive blocks of `ep`
  along the flattened (s, c) index i = s · cp + c): group i // ep, position i mod ep.
- `ep_dp`: the ranks holding the *same* experts (same i mod ep): world / ep of them; the
  experts' gradients are averaged over it.

Everything above is pure arithmetic over (sizes, rank) and testable without processes;
`build_mesh` makes the `DeviceMesh` and the process groups of a running job.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.distributed as dist

DIMS = ("dp_replicate", "dp_shard", "cp")
"""The dims of the device mesh, outermost first."""

GROUPS = ("dp", "cp", "dp_shard_cp", "dp_replicate", "ep", "ep_dp")
"""The process-group kinds of `rank_groups`, in the order `build_mesh` creates them."""


@dataclasses.dataclass(frozen=True)
class ParallelSizes:
    """The validated sizes of a run's mesh (`resolve_sizes`)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    ep: int = 1

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: ranks that read different batches."""
        return self.dp_replicate * self.dp_shard

    @property
    def shard(self) -> int:
        """Ranks FSDP shards the parameters over (dp_shard × cp); 1 without FSDP."""
        return self.dp_shard * self.cp if self.fsdp else 1

    @property
    def fsdp(self) -> bool:
        """Whether parameters, gradients and optimizer state are sharded: over dp_shard × cp
        when that is more than one rank (context-parallel ranks hold the same weights, so FSDP
        shards over them too, as torchtitan does; expert parallelism needs it, see
        `zoo.parallel.fsdp`)."""
        return self.dp_shard * self.cp > 1

    def describe(self) -> str:
        """`dp_replicate=2 × dp_shard=4 × cp=1 (ep=2)`: the mesh in one line."""
        dims = " × ".join(f"{name}={getattr(self, name)}" for name in DIMS)
        return f"{dims} (ep={self.ep})"


def resolve_sizes(
    world: int,
    dp_replicate: int | None = None,
    dp_shard: int = 1,
    cp: int = 1,
    ep: int = 1,
    num_experts: int | None = None,
) -> ParallelSizes:
    """The mesh sizes for `world` processes; `dp_replicate=None` takes what the other dims
    leave (world ÷ (dp_shard × cp)), so the defaults are plain data parallelism over every
    process. `num_experts`: the model's routed experts per MoE layer (0: no MoE; None: the
    model is not known yet and ep_size is checked against the ranks only).

    A size that does not fit raises `ValueError`, one line naming the recipe key
    (`parallel.<name>_size`) and the numbers.
    """
    for key, value in (("dp_shard_size", dp_shard), ("cp_size", cp), ("ep_size", ep)):
        if value < 1:
            raise ValueError(f"parallel.{key}={value}: must be at least 1")
    inner = dp_shard * cp
    if dp_replicate is None:
        if world % inner:
            raise ValueError(
                f"parallel.dp_shard_size={dp_shard} × parallel.cp_size={cp} = {inner} does not "
                f"divide the world size {world}"
            )
        dp_replicate = world // inner
    elif dp_replicate < 1:
        raise ValueError(f"parallel.dp_replicate_size={dp_replicate}: must be at least 1")
    elif dp_replicate * inner != world:
        raise ValueError(
            f"parallel.dp_replicate_size={dp_replicate}: dp_replicate × dp_shard × cp = "
            f"{dp_replicate} × {dp_shard} × {cp} = {dp_replicate * inner}, but the world size "
            f"is {world}"
        )
    if inner % ep:
        raise ValueError(
            f"parallel.ep_size={ep}: it must divide dp_shard × cp = {dp_shard} × {cp} = {inner} "
            "(expert parallelism borrows its ranks from those dims)"
        )
    if ep > 1 and num_experts == 0:
        raise ValueError(f"parallel.ep_size={ep}: the model has no experts (num_experts=0)")
    if ep > 1 and num_experts and num_experts % ep:
        raise ValueError(
            f"parallel.ep_size={ep}: the model's num_experts={num_experts} is not divisible by it"
        )
    return ParallelSizes(dp_replicate, dp_shard, cp, ep)


def coordinates(sizes: ParallelSizes, rank: int) -> dict[str, int]:
    """`rank`'s place on the mesh: {"dp_replicate": r, "dp_shard": s, "cp": c}."""
    if not 0 <= rank < sizes.world:
        raise ValueError(f"rank={rank} is not in [0, world size {sizes.world})")
    c = rank % sizes.cp
    s = rank // sizes.cp % sizes.dp_shard
    return {"dp_replicate": rank // (sizes.cp * sizes.dp_shard), "dp_shard": s, "cp": c}


def rank_groups(sizes: ParallelSizes) -> dict[str, list[list[int]]]:
    """Every group of each kind in `GROUPS` (see the module docstring): kind -> groups, each
    a list of ranks in group order; the groups of a kind partition the ranks."""
    R, S, C, E = sizes.dp_replicate, sizes.dp_shard, sizes.cp, sizes.ep
    inner = S * C  # the flattened (s, c) index i = s · C + c, within one replica r
    B = inner // E  # expert-parallel groups per replica

    def rank(r: int, i: int) -> int:
        return r * inner + i

    return {
        "dp": [[rank(r, s * C + c) for r in range(R) for s in range(S)] for c in range(C)],
        "cp": [[rank(r, s * C + c) for c in range(C)] for r in range(R) for s in range(S)],
        "dp_shard_cp": [[rank(r, i) for i in range(inner)] for r in range(R)],
        "dp_replicate": [[rank(r, i) for r in range(R)] for i in range(inner)],
        "ep": [[rank(r, b * E + j) for j in range(E)] for r in range(R) for b in range(B)],
        "ep_dp": [[rank(r, b * E + j) for r in range(R) for b in range(B)] for j in range(E)],
    }  # fmt: skip


def group_of(groups: list[list[int]], rank: int) -> tuple[int, list[int]]:
    """(`rank`'s index within its group, that group's ranks) among `groups` of one kind."""
    for group in groups:
        if rank in group:
            return group.index(rank), group
    raise ValueError(f"rank {rank} is in none of the groups {groups}")


def data_rank(sizes: ParallelSizes, rank: int) -> tuple[int, int]:
    """(this rank's data-parallel index, the number of data-parallel ranks): what the batch
    iterators take as (rank, world_size). Ranks of one context-parallel group share an index."""
    index, group = group_of(rank_groups(sizes)["dp"], rank)
    return index, len(group)


@dataclasses.dataclass
class Mesh:
    """The mesh of a running job: the `DeviceMesh` over `DIMS`, the one FSDP shards over, and
    this rank's process group of every kind in `GROUPS`."""

    sizes: ParallelSizes
    rank: int
    device_mesh: Any
    """torch's DeviceMesh, dims `DIMS`."""
    fsdp_mesh: Any
    """What `fully_shard` takes: 1-D ("dp_shard_cp",), or 2-D ("dp_replicate", "dp_shard_cp")
    for HSDP (dp_replicate > 1)."""
    groups: dict[str, Any]
    """kind -> this rank's `torch.distributed.ProcessGroup` of that kind."""

    @property
    def data_rank(self) -> tuple[int, int]:
        return data_rank(self.sizes, self.rank)


def build_mesh(sizes: ParallelSizes, device_type: str) -> Mesh:
    """The `Mesh` of this process in the running job (torch.distributed initialised, with
    `sizes.world` processes; every process calls this, in the same order of collectives).
    `device_type` is "cuda" or "cpu" (gloo)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized() or dist.get_world_size() != sizes.world:
        found = dist.get_world_size() if dist.is_initialized() else 1
        raise ValueError(
            f"the mesh {sizes.describe()} needs {sizes.world} processes, this job has {found}"
        )
    mesh = init_device_mesh(
        device_type, (sizes.dp_replicate, sizes.dp_shard, sizes.cp), mesh_dim_names=DIMS
    )
    shard = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    fsdp_mesh = mesh["dp_replicate", "dp_shard_cp"] if sizes.dp_replicate > 1 else shard
    rank = dist.get_rank()
    groups = {}
    for kind, layout in rank_groups(sizes).items():
        # Every process creates every group (torch requires it), then keeps its own.
        mine, _ = dist.new_subgroups_by_enumeration(layout)
        groups[kind] = mine
    return Mesh(sizes, rank, mesh, fsdp_mesh, groups)


def format_groups(sizes: ParallelSizes, max_world: int = 16) -> list[str]:
    """Lines naming the ranks of every group kind (for `--dry-run`); only each kind's count of
    groups beyond `max_world` ranks."""
    lines = []
    for kind, groups in rank_groups(sizes).items():
        if sizes.world <= max_world:
            lines.append(f"{kind:<13}{' '.join(str(g) for g in groups)}")
        else:
            lines.append(f"{kind:<13}{len(groups)} groups of {len(groups[0])} ranks")
    return lines


# ---------------------------------------------------------------------------------------------
# Memory per rank

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN = 34
"""Activations one block keeps for its backward, per token per hidden unit, at 16-bit
activations (Korthikanti et al. 2022, "Reducing activation recomputation", s·b·h·34 without
the attention-score term, which flash-style attention and the linear mixers do not store)."""


def memory_per_rank(
    sizes: ParallelSizes,
    *,
    parameters: int,
    expert_parameters: int,
    largest_block_parameters: int,
    hidden_size: int,
    num_layers: int,
    vocab_size: int,
    seq_len: int,
    micro_batch_size: int,
    precision: str = "bf16",
) -> dict[str, Any]:
    """Bytes each rank holds while training, by part; a dict ready to print or quote.

    Weights, gradients and AdamW's two moments are fp32 (4 + 4 + 8 bytes per parameter held).
    A rank holds, of the `parameters - expert_parameters` dense ones, 1/(dp_shard × cp) under
    FSDP (dp_shard > 1) and all of them otherwise; of the `expert_parameters` (every routed
    expert of every MoE layer), 1/ep under expert parallelism, and 1/(dp_shard × cp) under FSDP
    (the experts' own shards over the ranks holding the same experts).

    Activations at the recipe's context, t = seq_len / cp tokens per rank, b = micro_batch_size,
    a = 2 bytes (bf16/fp16) or 4 (fp32):
        blocks  = num_layers × 34 · b · t · hidden_size × a / 2
        logits  = b · t · vocab_size × (a + 8)       (the logits, their fp32 copy and gradient)
    FSDP adds the unsharded parameters of two blocks at a time (one computing, one prefetched):
        gathered = 2 × largest_block_parameters × a.
    No activation checkpointing, no allocator fragmentation: a lower bound to plan with.
    """
    a = _BYTES[precision]
    dense = parameters - expert_parameters
    dense_held = dense / sizes.shard
    expert_held = expert_parameters / (sizes.shard if sizes.fsdp else sizes.ep)
    held = dense_held + expert_held
    tokens = seq_len // sizes.cp
    blocks = num_layers * ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN * micro_batch_size * tokens
    blocks = blocks * hidden_size * a // 2
    logits = micro_batch_size * tokens * vocab_size * (a + 8)
    gathered = 2 * largest_block_parameters * a if sizes.fsdp else 0
    parts = {
        "parameters": round(4 * held),
        "gradients": round(4 * held),
        "optimizer": round(8 * held),
        "activations": blocks + logits,
        "fsdp_gathered": gathered,
    }
    return {
        "mesh": sizes.describe(),
        "parameters_held": round(held),
        "tokens_per_rank": micro_batch_size * tokens,
        "bytes": parts,
        "total_bytes": sum(parts.values()),
        "total_gib": sum(parts.values()) / 2**30,
    }
