"""What every converter of a released checkpoint folder shares: reading its tensors (nothing but
tensors is ever unpickled), building the zoo model in the weights' dtype and loading them
strictly, and the `ForeignFormat` record `zoo.convert.convert_checkpoint` dispatches on.

A foreign format is a checkpoint folder written by another project's own code (mamba_ssm's
`MambaLMHeadModel`, OpenNLPLab's TransNormerLLM, fla's HGRN2, safari's Hyena): a config.json in
that project's schema and its weights. Each converter module holds one `ForeignFormat`:
`matches` recognises the config.json, `config` maps it to a zoo config (a one-line `ValueError`
naming the field for anything the zoo cannot express, before any weight is read) and `load`
builds the converted zoo model from the folder.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from zoo.configuration import ZooConfig
from zoo.modeling import ZooForCausalLM

try:  # builds the target without drawing random weights that the state dict overwrites anyway
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover - other transformers layouts
    from contextlib import nullcontext as no_init_weights

__all__ = [
    "EMBED",
    "FLA_ACCEPTED",
    "FLA_ATTN_MODES",
    "FLA_BASE_DEFAULTS",
    "FLA_SAME_NAME",
    "HEAD",
    "ForeignFormat",
    "check_fla_config",
    "fla_mlp_width",
    "generic_config_fields",
    "load_converted",
    "load_tensor_file",
    "load_weights",
    "read_config",
    "refuse",
    "rename_fla_state_dict",
    "weight_file",
]

logger = logging.getLogger(__name__)

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class ForeignFormat:
    """A released checkpoint layout that converts to a zoo family (one direction)."""

    name: str  # the source project's name for its format, e.g. "transnormer"
    target: str  # the zoo model_type it becomes, e.g. "zoo_tnl"
    matches: Callable[[Mapping[str, Any]], bool]  # does this config.json belong to the format?
    config: Callable[[Mapping[str, Any]], ZooConfig]  # config.json -> zoo config, or ValueError
    load: Callable[[Path], ZooForCausalLM]  # folder -> converted zoo model (eval mode)

    @property
    def direction(self) -> str:
        return f"{self.name}->{self.target}"


def refuse(source: str, field: str, value: Any, why: str) -> ValueError:
    """The one-line error for a config field the zoo cannot express."""
    return ValueError(f"{source} config field {field}={value!r} cannot be converted: {why}")


@lru_cache(maxsize=1)
def generic_config_fields() -> frozenset[str]:
    """The fields every transformers `PretrainedConfig` writes (output_hidden_states,
    architectures, ...): in a remote-code model's config.json they say nothing about its network
    (the fields that do, such as tie_word_embeddings, each converter reads itself)."""
    import transformers

    return frozenset(transformers.PretrainedConfig().to_dict())


# fla's models (HGRN2, GLA): config fields carried over under the same name, and fields that do
# not change a converted model's outputs (how fla computes, what a file records about itself).
FLA_SAME_NAME = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "tie_word_embeddings",
    "initializer_range",
    "use_cache",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
FLA_ACCEPTED = frozenset(
    {
        "fuse_norm",
        "fuse_swiglu",
        "fuse_cross_entropy",
        "fuse_linear_cross_entropy",
        "model_type",
        "architectures",
        "transformers_version",
        "torch_dtype",
        "dtype",
    }
)
_FLA_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# fla's config defaults its models share (fla 0.6), for fields a config.json leaves out; each
# converter adds its model's own.
FLA_BASE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "attn_mode": "chunk",
    "use_short_conv": False,
    "conv_size": 4,
    "hidden_ratio": 4,
    "intermediate_size": None,
    "hidden_act": "swish",
    "max_position_embeddings": 2048,
    "elementwise_affine": True,
    "norm_eps": 1e-6,
    "attn": None,
    "use_cache": True,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "use_l2warp": False,
    "attnres_block_size": None,
}
FLA_ATTN_MODES = ("chunk", "fused_chunk", "fused_recurrent")


def check_fla_config(
    fields: Mapping[str, Any],
    source: str,
    known: frozenset[str],
    refusals: tuple[tuple[str, bool, str], ...],
    get: Callable[[str], Any],
    short_convs: bool = False,
) -> int:
    """The checks every fla converter runs on a config.json, before any weight is read: no field
    outside `known` (and transformers' generic ones), none of the model's `refusals` (field,
    refused, why) nor of what no fla conversion expresses (short convolutions, another MLP
    activation, hybrid attention layers, attention residuals, an unknown kernel mode), a
    positive integer hidden_size (returned); `use_l2warp=True` is dropped with a warning, as it
    only adds a gradient penalty in training. A model whose zoo layer has fla's short
    convolutions (`short_convs`, Gated DeltaNet) checks `use_short_conv` among its refusals."""
    for field, value in fields.items():
        if field not in known | generic_config_fields() and not field.startswith("_"):
            raise refuse(source, field, value, "not a field of fla's config this converter knows")
    shared = (
        (
            "use_short_conv",
            not short_convs and bool(get("use_short_conv")),
            "zoo's layer has no short convolutions",
        ),
        ("hidden_act", get("hidden_act") != "swish", "zoo's gates and SwiGLU MLP are SiLU"),
        ("attn", bool(get("attn")), "hybrid softmax-attention layers are not converted"),
        ("attnres_block_size", get("attnres_block_size") is not None, "no attention residuals"),
        (
            "attn_mode",
            get("attn_mode") not in FLA_ATTN_MODES,
            f"fla knows only {list(FLA_ATTN_MODES)}",
        ),
    )
    for field, refused, why in (*refusals, *shared):
        if refused:
            raise refuse(source, field, get(field), why)
    if get("use_l2warp"):
        logger.warning(
            "%s config field use_l2warp=True dropped: it only adds a penalty to the gradient in "
            "training and does not change the converted model's outputs",
            source,
        )
    hidden_size = get("hidden_size")
    if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size <= 0:
        raise refuse(source, "hidden_size", hidden_size, "must be a positive integer")
    return hidden_size


def rename_fla_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    shared: Mapping[str, str],
    per_layer: Mapping[str, str],
    source: str,
) -> dict[str, torch.Tensor]:
    """An fla state dict under zoo's names: `shared` maps whole keys, `per_layer` the part after
    `model.layers.i.`; tensors unchanged. A key outside both is a `ValueError` naming it."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in shared:
            converted[shared[key]] = tensor
            continue
        match = _FLA_LAYER.match(key)
        if match is None or match.group(2) not in per_layer:
            raise ValueError(f"{source} state dict key {key!r} has no zoo counterpart")
        converted[f"model.layers.{match.group(1)}.{per_layer[match.group(2)]}"] = tensor
    return converted


def fla_mlp_width(hidden_size: int, hidden_ratio: Any, intermediate_size: Any) -> int:
    """The width of fla's `GatedMLP`, the MLP of its HGRN2 and GLA models: `intermediate_size`,
    else 2/3 · hidden_ratio · d (ratio None = 4) rounded up to a multiple of 256."""
    if intermediate_size is not None:
        return intermediate_size
    width = int(hidden_size * (4 if hidden_ratio is None else hidden_ratio) * 2 / 3)
    return 256 * ((width + 255) // 256)


def read_config(src: str | Path) -> dict[str, Any]:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint config at {path} (looked for config.json)")
    return json.loads(path.read_text())


def weight_file(src: str | Path, names: tuple[str, ...] = WEIGHT_FILES) -> Path:
    """The first of `names` present in `src` (safetensors before a torch `.bin`)."""
    src = Path(src)
    for name in names:
        if (src / name).is_file():
            return src / name
    raise FileNotFoundError(f"no weights in {src} (looked for {' or '.join(names)})")


def _load_error(error: Exception) -> str:
    """One line for a failed load; torch's weights_only message is many lines whose first one
    advises turning weights_only off, so only the part naming what was refused is kept."""
    text = str(error)
    match = re.search(r"Unsupported (?:global: GLOBAL \S+|operand \S+|[^\n.]+)", text)
    lines = text.strip().splitlines()
    detail = match.group(0) if match else (lines[0] if lines else "")
    if "weights_only" in detail:
        detail = "it holds objects other than tensors"
    return f"{type(error).__name__}: {detail}"


def load_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a torch `.bin`, read with transformers'
    `load_state_dict` (torch's loader with `weights_only=True`, on the CPU, for a `.bin`):
    a pickle that holds anything but tensors is refused with a `ValueError` naming the file, and
    none of its code runs."""
    from transformers.modeling_utils import load_state_dict

    path = Path(path)
    try:
        state_dict = load_state_dict(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError (a forbidden global), a corrupt file, ...
        raise ValueError(
            f"{path}: refused, not a plain tensor checkpoint ({_load_error(error)}); only "
            "tensors are read (weights_only=True), nothing else is unpickled or run"
        ) from error
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise ValueError(f"{path}: refused, not a dict of named tensors")
    return dict(state_dict)


_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def load_weights(src: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: the shards its index names (safetensors first, then
    torch `.bin`; the released 1B-7B models ship sharded), else its one weight file; all read
    with `load_tensor_file` (tensors only)."""
    src = Path(src)
    for name in _INDEXES:
        index = src / name
        if not index.is_file():
            continue
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise ValueError(f"{index}: no weight_map naming the shard files")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise ValueError(f"{index}: shard {shard!r} is not a file in {src}")
            tensors.update(load_tensor_file(src / shard))
        return tensors
    return load_tensor_file(weight_file(src))


def load_converted(
    model_class: type[ZooForCausalLM],
    config: ZooConfig,
    state_dict: dict[str, torch.Tensor],
    src: str | Path,
    *,
    embed_name: str = "the embedding",
) -> ZooForCausalLM:
    """`model_class(config)` in the weights' dtype holding `state_dict` (zoo key names), loaded
    strictly; in eval mode. A tied model may come with or without `lm_head.weight`; with it, the
    head must equal the embedding. A key or shape config.json does not explain is a `ValueError`
    naming `src`."""
    dtype = state_dict[EMBED].dtype if EMBED in state_dict else torch.float32
    config.dtype = dtype
    with no_init_weights():
        model = model_class(config)
    model.to(dtype=dtype)
    if config.tie_word_embeddings and EMBED in state_dict:
        if HEAD in state_dict and not torch.equal(state_dict[HEAD], state_dict[EMBED]):
            raise ValueError(
                f"{src}: the embeddings are tied but lm_head.weight differs from {embed_name}"
            )
        state_dict[HEAD] = state_dict[EMBED]
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:  # missing keys or shapes config.json does not explain
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ValueError(
            f"{src}: the weights do not match config.json: {' '.join(lines[1:3] or lines[:1])}"
        ) from error
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
