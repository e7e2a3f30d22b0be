"""Checks a local checkpoint folder before transformers reads it, so a bad file gets a clear error.

A truncated or corrupt safetensors file otherwise surfaces as `SafetensorError: invalid header
length` from deep inside the loader, without the file's name. We read each file's header (cheap:
no tensor data is touched) and compare the length it declares with the size on disk.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


class CheckpointError(OSError):
    """A checkpoint file is missing, truncated or corrupt; the message names the file."""


def check_safetensors_file(path: Path) -> dict:
    """The header of a complete safetensors file at `path` (its tensors' dtypes, shapes and
    offsets); `CheckpointError` unless the file is whole."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file is missing")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file (header declares {header_len} "
                f"bytes, the file has {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: corrupt safetensors header ({error})") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes on disk, {expected} expected)"
        )
    return header


def check_checkpoint_dir(directory: str | Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Validate config.json and every safetensors file of a local checkpoint folder; returns
    each stored tensor's shape and file, by name."""
    directory = Path(directory)
    config = directory / CONFIG_NAME
    if not config.is_file():
        raise CheckpointError(f"{config}: config file is missing")
    try:
        fields = json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config}: not valid JSON ({error})") from None
    model_type = fields.get("model_type") if isinstance(fields, dict) else None
    if not (isinstance(model_type, str) and model_type.startswith("zoo")):
        hint = (
            f"; `zoo convert {directory} OUT` turns a transformers {model_type} into a zoo model"
            if model_type in ("llama", "mixtral", "mamba")
            else ""
        )
        raise CheckpointError(
            f"{config}: model_type={model_type!r} is not a hybrid-zoo model (zoo_*); load it "
            f"with its own library's class{hint}"
        )
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as error:
            raise CheckpointError(f"{index}: not a valid weight index ({error!r})") from None
        files = [directory / shard for shard in shards]
    else:
        files = [directory / WEIGHTS_NAME]
    stored: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in files:
        for key, entry in check_safetensors_file(path).items():
            if key != "__metadata__":
                stored[key] = (tuple(entry["shape"]), path)
    return stored


def check_weights_fit(
    stored: dict[str, tuple[tuple[int, ...], Path]],
    expected: dict[str, tuple[int, ...]],
    config_file: Path,
    tied: dict[str, str] | None = None,
) -> None:
    """Refuse, before anything is loaded, weights that do not fit the model config.json
    describes: a tensor the model needs and no file has, one it has no place for, or one of
    another shape. The error names the file and the first keys.

    `tied` maps a weight the model ties to its source (the LM head to the embedding): a file may
    hold a copy of it (a state dict gathered from FSDP shards has one), which transformers
    ignores when it ties, as long as its shape is the source's."""
    tied = tied or {}
    copies = {k: tied[k] for k in set(stored) & set(tied) if tied[k] in expected}
    expected = {**expected, **{k: expected[src] for k, src in copies.items()}}
    missing = sorted(set(expected) - set(stored) - set(copies))
    unexpected = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(stored) & set(expected) if stored[k][0] != expected[k])
    if wrong:
        key = wrong[0]
        raise CheckpointError(
            f"{stored[key][1]}: {key} has shape {list(stored[key][0])} but {config_file} needs "
            f"{list(expected[key])} ({len(wrong)} tensor(s) of another shape: the config's "
            "widths or vocabulary differ from the weights')"
        )
    if missing:
        raise CheckpointError(
            f"{config_file}: {len(missing)} weight(s) the config needs are in no file "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the config "
            "describes a larger model than the weights (more layers?)"
        )
    if unexpected:
        key = unexpected[0]
        raise CheckpointError(
            f"{stored[key][1]}: {len(unexpected)} weight(s) have no place in the model of "
            f"{config_file} ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
        )
