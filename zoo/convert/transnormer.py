"""Convert OpenNLPLab's released TransNormerLLM checkpoints (OpenNLPLab/TransNormerLLM-385M, -1B,
-7B: remote code, `model_type "transnormer"`, `modeling_transnormer.py`) into zoo's TNL.

The released network is zoo's TNL recurrence, S_t = λ S_{t−1} + k_t v_tᵀ with SiLU on q and k,
the ALiBi-slope decay times the depth factor (1 − l/(L−1) + 1e-5) (`lightning_decay="alibi"`),
gain-free SRMSNorm (eps 1e-6) everywhere and the activation-free GLU, with three choices of its
own, each a zoo setting:

* the output gate is a plain full-rank linear map u: y = W_o (SRMSNorm(o) ⊙ x W_u)
  (`output_gate="linear"`);
* the layers named by `linear_use_lrpe_list` (the first one in the released models) apply LRPE
  with θ learned per head and channel to q and k (`layer_overrides: [{"lightning_lrpe": true},
  ...]`);
* the embeddings are scaled by √d unless `no_scale_embedding` (`embedding_multiplier`).

Config fields (released config.json -> zoo `TNLConfig`)::

    vocab_size, use_cache, tie_word_embeddings (default True),   same name
    pad_token_id, bos_token_id, eos_token_id
    decoder_embed_dim          -> hidden_size
    decoder_layers             -> num_hidden_layers
    decoder_attention_heads    -> num_attention_heads
    glu_dim (-1: the width)    -> intermediate_size
    init_std                   -> initializer_range
    no_scale_embedding         -> embedding_multiplier = 1 if true else √decoder_embed_dim
    linear_use_lrpe_list       -> layer_overrides (lightning_lrpe per layer); an empty list takes
                                  linear_use_lrpe for every layer
    norm_type "simplermsnorm"  -> norm_type "srmsnorm", rms_norm_eps 1e-6
    hidden_dim                 must equal decoder_embed_dim (zoo's q, k, v are d wide)
    linear_act_fun             must be "silu" (or "swish")
    bias                       must be false
    add_bos_token              tokenizer only (kept by the tokenizer files)

State dict keys (layer i; every `.weight`)::

    model.embed_tokens, lm_head                       unchanged
    model.layers.i.token_mixer.qkvu_proj (4d × d)  -> model.layers.i.mixer.{q,k,v,gate}_proj
                                                      (its four row blocks, in that order)
    model.layers.i.token_mixer.out_proj            -> model.layers.i.mixer.o_proj
    model.layers.i.token_mixer.lrpe.theta (H,1,D)  -> model.layers.i.mixer.lrpe_theta (H, D)
    model.layers.i.channel_mixer.l1 / l2 / l3      -> model.layers.i.channel_mixer.gate_proj /
                                                      up_proj / down_proj (l1(x) ⊙ l2(x): no
                                                      activation, so the order is moot)
    (SRMSNorm has no weights: token_norm, channel_norm, token_mixer.norm and final_norm hold none)

Refused from config.json alone, one line naming the field: a norm_type other than
"simplermsnorm" (the released code then uses LayerNorm), another activation, biases, a
hidden_dim other than the width, a linear_use_lrpe_list of the wrong length, and any field not
named here or in transformers' `PretrainedConfig` (its generic fields change nothing here).
Weights are read as tensors only (`zoo.convert.common.load_tensor_file`). Only this direction
exists: the released model is remote code, not a transformers class.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from zoo.configuration import TNLConfig
from zoo.convert.common import (
    ForeignFormat,
    generic_config_fields,
    load_converted,
    load_weights,
    read_config,
    refuse,
)
from zoo.modeling import TNLForCausalLM

__all__ = ["FORMAT", "config_from_transnormer", "from_transnormer", "state_dict_from_transnormer"]

SOURCE = "transnormer"
# SimpleRMSNorm's eps in the released norm.py (it takes no eps from the config).
SRMSNORM_EPS = 1e-6
_FIELDS = {
    "decoder_embed_dim",
    "decoder_layers",
    "decoder_attention_heads",
    "hidden_dim",
    "glu_dim",
    "norm_type",
    "linear_act_fun",
    "linear_use_lrpe_list",
    "linear_use_lrpe",
    "no_scale_embedding",
    "bias",
    "init_std",
    "add_bos_token",
    "vocab_size",
    "use_cache",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
}
_METADATA = {"auto_map", "torch_dtype", "dtype", "transformers_version", "_name_or_path"}


def is_transnormer_config(fields: Mapping[str, Any]) -> bool:
    return fields.get("model_type") == "transnormer"


def _check(fields: Mapping[str, Any], field: str, allowed: tuple[Any, ...], why: str) -> None:
    if field in fields and fields[field] not in allowed:
        raise refuse(SOURCE, field, fields[field], why)


def config_from_transnormer(fields: Mapping[str, Any]) -> TNLConfig:
    """zoo's `TNLConfig` for a released TransNormerLLM config.json; a one-line `ValueError`
    naming the field for what zoo's TNL cannot express."""
    for field in fields:
        if field not in _FIELDS | _METADATA | generic_config_fields() and not field.startswith("_"):
            raise refuse(SOURCE, field, fields[field], "not a field this converter knows")
    _check(fields, "norm_type", ("simplermsnorm",), "zoo's TNL has SRMSNorm only (others: "
           "the released code's LayerNorm)")  # fmt: skip
    _check(fields, "linear_act_fun", ("silu", "swish"), "zoo's TNL applies SiLU to q and k")
    _check(fields, "bias", (False,), "zoo's TNL projections have no biases")
    width = int(fields.get("decoder_embed_dim", 1024))
    layers = int(fields.get("decoder_layers", 24))
    hidden_dim = fields.get("hidden_dim", 1024)
    if hidden_dim != width:
        raise refuse(
            SOURCE, "hidden_dim", hidden_dim,
            f"zoo's TNL mixes at the model width (decoder_embed_dim={width})",
        )  # fmt: skip
    lrpe = fields.get("linear_use_lrpe_list") or []
    if not isinstance(lrpe, list) or (lrpe and len(lrpe) != layers):
        raise refuse(
            SOURCE, "linear_use_lrpe_list", lrpe,
            f"expected one 0/1 per layer (decoder_layers={layers}) or []",
        )  # fmt: skip
    if not lrpe:  # the released code then reads config.linear_use_lrpe for every layer
        lrpe = [fields.get("linear_use_lrpe", False)] * layers
    glu_dim = fields.get("glu_dim", 2816)
    return TNLConfig(
        vocab_size=int(fields.get("vocab_size", 64000)),
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=int(fields.get("decoder_attention_heads", 8)),
        intermediate_size=width if glu_dim == -1 else int(glu_dim),
        norm_type="srmsnorm",
        rms_norm_eps=SRMSNORM_EPS,
        lightning_decay="alibi",
        output_gate="linear",
        layer_overrides=[{"lightning_lrpe": True} if use else None for use in lrpe],
        embedding_multiplier=1.0 if fields.get("no_scale_embedding", False) else math.sqrt(width),
        initializer_range=float(fields.get("init_std", 0.02)),
        tie_word_embeddings=bool(fields.get("tie_word_embeddings", True)),
        use_cache=bool(fields.get("use_cache", True)),
        pad_token_id=fields.get("pad_token_id", 0),
        bos_token_id=fields.get("bos_token_id", 1),
        eos_token_id=fields.get("eos_token_id", 2),
    )


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(token_mixer|channel_mixer)\.(.+)$")
_CHANNEL = {
    "l1.weight": "gate_proj.weight",
    "l2.weight": "up_proj.weight",
    "l3.weight": "down_proj.weight",
}
_SHARED = {"model.embed_tokens.weight", "lm_head.weight"}
_IGNORED = re.compile(r"(^|\.)decoder\.version$")  # the released class ignores it on load


def state_dict_from_transnormer(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released TransNormerLLM keys -> zoo TNL keys (the fused qkvu projection split in four)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in _SHARED:
            out[key] = tensor
            continue
        if _IGNORED.search(key):
            continue
        match = _LAYER_RE.match(key)
        if match is None:
            raise ValueError(f"TransNormerLLM weight {key!r} has no place in zoo's TNL")
        i, part, rest = match.groups()
        prefix = f"model.layers.{i}"
        if part == "channel_mixer" and rest in _CHANNEL:
            out[f"{prefix}.channel_mixer.{_CHANNEL[rest]}"] = tensor
        elif rest == "qkvu_proj.weight":
            for name, block in zip(("q", "k", "v", "gate"), tensor.chunk(4, dim=0), strict=True):
                out[f"{prefix}.mixer.{name}_proj.weight"] = block.contiguous()
        elif rest == "out_proj.weight":
            out[f"{prefix}.mixer.o_proj.weight"] = tensor
        elif rest == "lrpe.theta":
            out[f"{prefix}.mixer.lrpe_theta"] = tensor.reshape(tensor.shape[0], -1)
        else:
            raise ValueError(f"TransNormerLLM weight {key!r} has no place in zoo's TNL")
    return out


def from_transnormer(src: str | Path) -> TNLForCausalLM:
    """zoo's `TNLForCausalLM` from a released TransNormerLLM folder (config.json and
    model.safetensors or pytorch_model.bin, possibly sharded as *-of-*.bin/.safetensors with an
    index). The config is checked before any weight is read."""
    config = config_from_transnormer(read_config(src))
    state_dict = state_dict_from_transnormer(load_weights(src))
    return load_converted(
        TNLForCausalLM, config, state_dict, src,
        embed_name="model.embed_tokens.weight",
    )  # fmt: skip


FORMAT = ForeignFormat(
    SOURCE, "zoo_tnl", is_transnormer_config, config_from_transnormer, from_transnormer
)
