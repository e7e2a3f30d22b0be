"""Training checkpoints without pickle: every tensor in safetensors, everything else in JSON.

A checkpoint folder (`checkpoints/step-NNNNNNNN`) holds

    model.safetensors       the full model state (tied tensors once, their aliases in the state)
    optimizer.safetensors   the optimizer's tensors, keyed "<parameter name>/<state name>"
    rank-<r>.safetensors    process r's torch (and CUDA) RNG states
    rank-<r>.json           process r's Python and NumPy RNG states and its data position
    trainer_state.json      step, tokens, recipe, model config, optimizer hyper-parameters,
                            scheduler state, and the manifest: size and SHA-256 of every file

or, written by a run that shards its model with FSDP2 (`parallel.dp_shard_size > 1`), instead of
the first two files one pair per shard, i = 0 … n-1 over the n = dp_shard × cp ranks of a replica:

    model-shard-<i>-of-<n>.safetensors      shard i's local pieces of the model's tensors
    optimizer-shard-<i>-of-<n>.safetensors  and of the optimizer's (keys as above)

written by the ranks of the first replica (HSDP's other replicas hold the same pieces), and
`trainer_state.json` records the layout under "sharding": the mesh sizes, n, and every tensor's
global shape and placements (`"shard(0)"`: split along dim 0 into n `torch.chunk` pieces, in
shard order; `"replicate"`), so the full tensors can be rebuilt from the files alone.

`trainer_state.json` is written last, so a folder without it is not a checkpoint. Loading reads
safetensors and JSON only (nothing is ever unpickled, whatever a file contains) and `verify`
checks every file against the manifest and every stored tensor for NaN or infinity first, so a
tampered, truncated or non-finite checkpoint is refused with the file's name before anything
is restored. The model and optimizer go through torch's distributed-checkpoint state-dict API
(`get_state_dict` / `set_state_dict`), which sees through DDP and FSDP wrappers and names the
state by parameter, so a checkpoint does not depend on how the model was wrapped.

A full checkpoint loads into any layout of the same world size (one process, DDP, FSDP); a
sharded one only into the mesh that wrote it. For another world size or mesh, re-shard it:

    python -m zoo.train_state reshard RUN/checkpoints/step-N OUT --world-size M

writes OUT, a full checkpoint for M processes (see `reshard` for the data position), which the
run resumes with `--resume OUT`; its later checkpoints are written in its own layout again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from zoo.atomic import write_json_atomic
from zoo.checkpoint import CheckpointError
from zoo.parallel.mesh import Mesh, coordinates

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


def _rank_files(rank: int) -> tuple[str, str]:
    return f"rank-{rank}.safetensors", f"rank-{rank}.json"


def _shard_files(shard: int, shards: int) -> tuple[str, str]:
    suffix = f"shard-{shard:05d}-of-{shards:05d}.safetensors"
    return f"model-{suffix}", f"optimizer-{suffix}"


def reshard_command(checkpoint: Path | str, world_size: int) -> str:
    """The command that makes `checkpoint` loadable by `world_size` processes (any mesh)."""
    return f"python -m zoo.train_state reshard {checkpoint} OUT --world-size {world_size}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path, files: list[str]) -> dict[str, dict[str, Any]]:
    """{file: {bytes, sha256}} of `files` in `folder`, what `verify` checks them against."""
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
        for name in files
    }


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, str]:
    """Save `tensors` once per storage; returns {alias: key} for the tensors that shared one
    (tied weights), which safetensors cannot store twice."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, tensor in tensors.items():
        tag = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and tag in seen:
            aliases[key] = seen[tag]
            continue
        seen[tag] = key
        unique[key] = tensor.detach().contiguous().cpu()
    save_file(unique, str(path))
    return aliases


def _optimizer_tensors(optim_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter tensors, keyed "<parameter name>/<state name>"."""
    return {
        f"{name}/{key}": value
        for name, entry in optim_state["state"].items()
        for key, value in entry.items()
    }


def _optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict[str, Any]:
    """`_optimizer_tensors` and the saved param groups back as an optimizer state dict."""
    optim_state: dict[str, Any] = {"state": {}, "param_groups": []}
    for key, tensor in tensors.items():
        name, _, entry = key.rpartition("/")
        optim_state["state"].setdefault(name, {})[entry] = tensor
    for group in groups:
        if "betas" in group:
            group = {**group, "betas": tuple(group["betas"])}
        optim_state["param_groups"].append(group)
    return optim_state


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------
# Sharded tensors (FSDP2's DTensors)


def _placement(placement: Any, key: str) -> str:
    """A DTensor placement as the checkpoint records it: "replicate" or "shard(<dim>)"."""
    from torch.distributed.tensor import Replicate, Shard

    if isinstance(placement, Replicate):
        return "replicate"
    if type(placement) is Shard:
        return f"shard({placement.dim})"
    raise CheckpointError(f"{key}: placement {placement} cannot be checkpointed (Shard, Replicate)")


def _local_pieces(
    tensors: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """This rank's piece of every tensor (a DTensor's local shard, a plain tensor whole) and the
    layout: {key: {"shape": global shape, "placements": [...] (None for a plain tensor)}}."""
    from torch.distributed.tensor import DTensor

    pieces, layout = {}, {}
    for key, value in tensors.items():
        if isinstance(value, DTensor):
            pieces[key] = value.to_local()
            placements = [_placement(p, key) for p in value.placements]
            layout[key] = {"shape": list(value.shape), "placements": placements}
        else:
            pieces[key] = value
            layout[key] = {"shape": list(value.shape), "placements": None}
    return pieces, layout


def _as_template(pieces: dict[str, torch.Tensor], template: dict[str, Any], path: Path) -> dict:
    """`pieces` (one shard file's tensors) as DTensors laid out like `template` (this run's
    sharded state dict); a piece of another shape names the key and the re-shard command."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, like in template.items():
        if key not in pieces:
            raise CheckpointError(f"{path}: no tensor {key}")
        piece = pieces[key]
        if not isinstance(like, DTensor):
            out[key] = piece
            continue
        local = like.to_local()
        if piece.shape != local.shape:
            raise CheckpointError(
                f"{path}: {key} has a local shape {list(piece.shape)}, this rank holds "
                f"{list(local.shape)}: the checkpoint was sharded otherwise"
            )
        out[key] = DTensor.from_local(
            piece.to(local.device), like.device_mesh, like.placements, run_check=False,
            shape=like.shape, stride=like.stride(),
        )  # fmt: skip
    return out


def _full_tensor(pieces: list[torch.Tensor], record: dict[str, Any], key: str) -> torch.Tensor:
    """A tensor rebuilt from its `pieces`, one per shard in shard order, by its layout."""
    shards = [p for p in (record["placements"] or []) if p.startswith("shard(")]
    if not shards:
        return pieces[0]
    if len(shards) > 1:
        raise CheckpointError(f"{key}: sharded on more than one mesh dim ({record})")
    dim = int(shards[0][len("shard(") : -1])
    full = torch.cat(pieces, dim=dim)
    if list(full.shape) != record["shape"]:
        raise CheckpointError(
            f"{key}: the shards join to shape {list(full.shape)}, not {record['shape']}"
        )
    return full


# ---------------------------------------------------------------------------------------------
# Save, verify, load


def save(
    folder: Path,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data: Any,
    meta: dict[str, Any],
    mesh: Mesh | None = None,
) -> None:
    """Write the checkpoint into `folder` (every process calls this; the main one writes the
    shared files and, last, trainer_state.json with the manifest). With the `mesh` of a run
    that shards its model (FSDP2), each rank of the first replica writes its shard's pieces;
    otherwise the main process writes the full state, gathered."""
    sharded = mesh is not None and mesh.sizes.fsdp
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
    else:
        model_state, optim_state = _state_dicts(model, optimizer)
    rank = accelerator.process_index
    rng_tensors, rng_plain = _rng_state()
    tensor_file, json_file = _rank_files(rank)
    save_file(rng_tensors, str(folder / tensor_file))
    write_json_atomic(folder / json_file, {**rng_plain, "data": data.state_dict()})
    layout: dict[str, Any] = {}
    aliases: dict[str, str] = {}  # tied tensors, as the main process's file stores them
    if sharded:
        assert mesh is not None
        shards = mesh.sizes.shard
        place = coordinates(mesh.sizes, rank)
        shard = place["dp_shard"] * mesh.sizes.cp + place["cp"]
        model_pieces, layout["model"] = _local_pieces(model_state)
        optim_pieces, layout["optimizer"] = _local_pieces(_optimizer_tensors(optim_state))
        if place["dp_replicate"] == 0:  # the other replicas hold the same pieces
            model_file, optim_file = _shard_files(shard, shards)
            aliases = _save_tensors(model_pieces, folder / model_file)
            save_file({k: v.contiguous().cpu() for k, v in optim_pieces.items()},
                      str(folder / optim_file))  # fmt: skip
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    if sharded:
        assert mesh is not None
        files = [name for i in range(shards) for name in _shard_files(i, shards)]
        layout = {"mesh": dataclasses.asdict(mesh.sizes), "shards": shards, **layout}
    else:
        aliases = _save_tensors(model_state, folder / MODEL_FILE)
        save_file(
            {k: v.contiguous().cpu() for k, v in _optimizer_tensors(optim_state).items()},
            str(folder / OPTIMIZER_FILE),
        )
        files = [MODEL_FILE, OPTIMIZER_FILE]
    for r in range(accelerator.num_processes):
        files += list(_rank_files(r))
    groups = [{k: _jsonable(v) for k, v in g.items()} for g in optim_state["param_groups"]]
    state = {
        **meta,
        "model_aliases": aliases,
        "optimizer_param_groups": groups,
        "scheduler": {k: _jsonable(v) for k, v in scheduler.state_dict().items()},
        **({"sharding": layout} if sharded else {}),
        "manifest": _manifest(folder, files),
    }
    write_json_atomic(folder / STATE_FILE, state)


def read_state(folder: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint (JSON, so reading it can run nothing)."""
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint state ({error})") from None
    if not isinstance(state, dict) or "manifest" not in state or "step" not in state:
        raise CheckpointError(f"{path}: not a checkpoint state (no step or manifest)")
    return state


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def _tensor_files(state: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(model files, optimizer files) of a checkpoint: one each, or one per shard in order."""
    sharding = state.get("sharding")
    if sharding is None:
        return [MODEL_FILE], [OPTIMIZER_FILE]
    pairs = [_shard_files(i, sharding["shards"]) for i in range(sharding["shards"])]
    return [m for m, _ in pairs], [o for _, o in pairs]


def verify(folder: Path) -> dict[str, Any]:
    """The checkpoint's state after checking every file of the manifest (present, same size,
    same SHA-256) and every stored tensor (finite); `CheckpointError` names what fails."""
    state = read_state(folder)
    for name, expected in state["manifest"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        size = path.stat().st_size
        if size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise CheckpointError(
                f"{path}: changed since it was written ({size} bytes, checksum differs)"
            )
    model_files, optimizer_files = _tensor_files(state)
    for name in [*model_files, *optimizer_files]:
        if name not in state["manifest"]:
            raise CheckpointError(f"{folder / name}: not in the checkpoint's manifest")
        for key, tensor in _load_tensors(folder / name).items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{folder / name}: {key} holds NaN or infinity")
    return state


def check_layout(folder: Path, state: dict[str, Any], mesh: Mesh | None, world_size: int) -> None:
    """Refuse (`CheckpointError`, naming the re-shard command) a sharded checkpoint whose mesh
    is not this run's; a full checkpoint loads into any layout."""
    sharding = state.get("sharding")
    if sharding is None:
        return
    ours = dataclasses.asdict(mesh.sizes) if mesh is not None and mesh.sizes.fsdp else None
    if ours != sharding["mesh"]:
        mine = "no FSDP" if ours is None else f"mesh {ours}"
        raise CheckpointError(
            f"{folder}: it is sharded for the mesh {sharding['mesh']}, this run has {mine}; "
            f"re-shard it first: {reshard_command(folder, world_size)}, then --resume OUT"
        )


def load(
    folder: Path,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data: Any,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Restore a verified checkpoint into the model, optimizer, scheduler, data position and
    RNGs of this process (`mesh`: the run's, when it shards its model); returns its state
    (step, tokens, ...)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    state = verify(folder)
    rank = accelerator.process_index
    check_layout(folder, state, mesh, accelerator.num_processes)
    groups = state["optimizer_param_groups"]
    if "sharding" in state:
        assert mesh is not None
        place = coordinates(mesh.sizes, rank)
        shard = place["dp_shard"] * mesh.sizes.cp + place["cp"]
        model_file, optim_file = _shard_files(shard, state["sharding"]["shards"])
        pieces = _load_tensors(folder / model_file)
        for alias, key in state["model_aliases"].items():
            pieces[alias] = pieces[key]
        template_model, template_optim = get_state_dict(model, optimizer)
        model_state = _as_template(pieces, template_model, folder / model_file)
        optim_pieces = _load_tensors(folder / optim_file)
        template = _optimizer_tensors(template_optim)
        optim_state = _optimizer_state(
            _as_template(optim_pieces, template, folder / optim_file), groups
        )
        options = StateDictOptions()
    else:
        model_state = _load_tensors(folder / MODEL_FILE)
        for alias, key in state["model_aliases"].items():
            model_state[alias] = model_state[key]
        optim_state = _optimizer_state(_load_tensors(folder / OPTIMIZER_FILE), groups)
        options = StateDictOptions(full_state_dict=True)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=options,
    )
    scheduler.load_state_dict(state["scheduler"])
    tensor_file, json_file = _rank_files(rank)
    try:
        plain = json.loads((folder / json_file).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{folder / json_file}: {error}") from None
    _set_rng_state(_load_tensors(folder / tensor_file), plain)
    data.load_state_dict(plain["data"])
    return state


# ---------------------------------------------------------------------------------------------
# Full tensors and re-sharding


def full_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model tensors, optimizer tensors "<parameter>/<state>") of a verified checkpoint,
    whole: read from a full checkpoint, or joined from a sharded one's pieces. Tied tensors
    appear once (their aliases are in the state's "model_aliases")."""
    state = verify(folder)
    model_files, optimizer_files = _tensor_files(state)
    sharding = state.get("sharding")
    out = []
    for kind, names in (("model", model_files), ("optimizer", optimizer_files)):
        parts = [_load_tensors(folder / name) for name in names]
        if sharding is None:
            out.append(parts[0])
            continue
        out.append({
            key: _full_tensor([p[key] for p in parts], sharding[kind][key], key)
            for key in parts[0]
        })  # fmt: skip
    return out[0], out[1]


def _data_position(data: dict[str, Any], old_world: int, new_world: int, path: Path) -> dict:
    """A process's data position (`rank-<r>.json` "data") for `new_world` processes: the
    position of `PackedSequences` (epoch, windows consumed by all processes) is the same on
    every rank and stays; the windows one process of `StreamedSequences` consumed scale by
    old_world / new_world, so all processes together are where they were."""
    if {"epoch", "position", "seed"} <= data.keys():
        return dict(data)
    if "consumed" in data:
        total = int(data["consumed"]) * old_world
        if total % new_world:
            raise CheckpointError(
                f"{path}: {total} windows consumed do not split over {new_world} processes"
            )
        return {**data, "consumed": total // new_world}
    raise CheckpointError(f"{path}: an unknown data position {sorted(data)}")


def reshard(source: Path, out: Path, world_size: int) -> Path:
    """Write `out`: the verified checkpoint `source` as a full checkpoint for `world_size`
    processes, which a run of that many processes resumes with any mesh (`--resume out`).

    The model and optimizer tensors are rebuilt whole (`full_state`). The data position is
    kept (`_data_position`): the run continues with the windows the original one would have
    read next, split over the new processes (each optimizer step reads the same windows; the
    few at an epoch's end that are skipped depend on micro_batch_size × processes). Process r
    keeps the RNG state of the original's process r (of process 0 for ranks it did not have).
    The new run is the same run up to floating-point summation order, not bit for bit.
    """
    if world_size < 1:
        raise ValueError(f"--world-size {world_size}: must be at least 1")
    if out.exists():
        raise OSError(f"{out}: already exists; choose a new folder for the re-sharded checkpoint")
    state = verify(source)
    old_world = int(state["world_size"])
    model, optimizer = full_state(source)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.items()}, str(tmp / MODEL_FILE))
    save_file({k: v.contiguous() for k, v in optimizer.items()}, str(tmp / OPTIMIZER_FILE))
    files = [MODEL_FILE, OPTIMIZER_FILE]
    for rank in range(world_size):
        old_tensor, old_json = _rank_files(rank if rank < old_world else 0)
        tensor_file, json_file = _rank_files(rank)
        shutil.copyfile(source / old_tensor, tmp / tensor_file)
        plain = json.loads((source / old_json).read_text())
        plain["data"] = _data_position(plain["data"], old_world, world_size, source / old_json)
        write_json_atomic(tmp / json_file, plain)
        files += [tensor_file, json_file]
    new_state = {k: v for k, v in state.items() if k not in ("sharding", "manifest")}
    new_state["world_size"] = world_size
    new_state["resharded_from"] = {"path": str(source), "world_size": old_world}
    new_state["manifest"] = _manifest(tmp, files)
    write_json_atomic(tmp / STATE_FILE, new_state)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    """`python -m zoo.train_state reshard SOURCE OUT --world-size M`; expected failures print
    one line and exit 2."""
    parser = argparse.ArgumentParser(
        prog="python -m zoo.train_state", description="Training checkpoints (zoo.train_state)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser(
        "reshard", help="write a checkpoint as a full one for another number of processes"
    )
    command.add_argument("source", type=Path, help="a checkpoint folder (RUN/checkpoints/step-N)")
    command.add_argument("out", type=Path, help="the new checkpoint folder (must not exist)")
    command.add_argument("--world-size", type=int, required=True, help="processes to resume on")
    args = parser.parse_args(argv)
    try:
        written = reshard(args.source, args.out, args.world_size)
    except (ValueError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"wrote {written}: a full checkpoint for {args.world_size} process(es); resume with "
        f"--resume {written}"
    )
    return written


if __name__ == "__main__":
    main()
