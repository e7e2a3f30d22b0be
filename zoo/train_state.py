"""Training checkpoints without pickle: every tensor in safetensors, everything else in JSON.

A checkpoint folder (`checkpoints/step-NNNNNNNN`) holds

    model.safetensors       the full model state (tied tensors once, their aliases in the state)
    optimizer.safetensors   the optimizer's tensors, keyed "<parameter name>/<state name>"
    rank-<r>.safetensors    process r's torch (and CUDA) RNG states
    rank-<r>.json           process r's Python and NumPy RNG states and its data position
    trainer_state.json      step, tokens, recipe, model config, optimizer hyper-parameters,
                            scheduler state, and the manifest: size and SHA-256 of every file

`trainer_state.json` is written last, so a folder without it is not a checkpoint. Loading reads
safetensors and JSON only (nothing is ever unpickled, whatever a file contains) and `verify`
checks every file against the manifest and every tensor for NaN or infinity first, so a
tampered, truncated or non-finite checkpoint is refused with the file's name before anything
is restored. The model and optimizer go through torch's distributed-checkpoint state-dict API
(`get_state_dict` / `set_state_dict`), which sees through DDP and FSDP wrappers and names the
state by parameter, so a checkpoint does not depend on how the model was wrapped.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from zoo.atomic import write_json_atomic
from zoo.checkpoint import CheckpointError

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


def _rank_files(rank: int) -> tuple[str, str]:
    return f"rank-{rank}.safetensors", f"rank-{rank}.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def save(
    folder: Path,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data: Any,
    meta: dict[str, Any],
) -> None:
    """Write the checkpoint into `folder` (every process calls this; the main one writes the
    shared files and, last, trainer_state.json with the manifest)."""
    model_state, optim_state = _state_dicts(model, optimizer)
    rank = accelerator.process_index
    rng_tensors, rng_plain = _rng_state()
    tensor_file, json_file = _rank_files(rank)
    save_file(rng_tensors, str(folder / tensor_file))
    write_json_atomic(folder / json_file, {**rng_plain, "data": data.state_dict()})
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    aliases = _save_tensors(model_state, folder / MODEL_FILE)
    optimizer_tensors = {
        f"{name}/{key}": value
        for name, entry in optim_state["state"].items()
        for key, value in entry.items()
    }
    save_file(
        {k: v.contiguous().cpu() for k, v in optimizer_tensors.items()},
        str(folder / OPTIMIZER_FILE),
    )
    groups = [{k: _jsonable(v) for k, v in g.items()} for g in optim_state["param_groups"]]
    files = [MODEL_FILE, OPTIMIZER_FILE]
    for r in range(accelerator.num_processes):
        files += list(_rank_files(r))
    state = {
        **meta,
        "model_aliases": aliases,
        "optimizer_param_groups": groups,
        "scheduler": {k: _jsonable(v) for k, v in scheduler.state_dict().items()},
        "manifest": {
            name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
            for name in files
        },
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
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        for key, tensor in _load_tensors(folder / name).items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{folder / name}: {key} holds NaN or infinity")
    return state


def load(
    folder: Path,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data: Any,
) -> dict[str, Any]:
    """Restore a verified checkpoint into the model, optimizer, scheduler, data position and
    RNGs of this process; returns its state (step, tokens, ...)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = verify(folder)
    model_state = _load_tensors(folder / MODEL_FILE)
    for alias, key in state["model_aliases"].items():
        model_state[alias] = model_state[key]
    optim_state: dict[str, Any] = {"state": {}, "param_groups": []}
    for key, tensor in _load_tensors(folder / OPTIMIZER_FILE).items():
        name, _, entry = key.rpartition("/")
        optim_state["state"].setdefault(name, {})[entry] = tensor
    for group in state["optimizer_param_groups"]:
        if "betas" in group:
            group = {**group, "betas": tuple(group["betas"])}
        optim_state["param_groups"].append(group)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True),
    )
    scheduler.load_state_dict(state["scheduler"])
    rank = accelerator.process_index
    tensor_file, json_file = _rank_files(rank)
    try:
        plain = json.loads((folder / json_file).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{folder / json_file}: {error}") from None
    _set_rng_state(_load_tensors(folder / tensor_file), plain)
    data.load_state_dict(plain["data"])
    return state
