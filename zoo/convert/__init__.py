"""Convert transformers' `LlamaForCausalLM`, `MixtralForCausalLM`, `MambaForCausalLM` and
`Mamba2ForCausalLM` to zoo's and back.

zoo's LLaMA is the same network as transformers' (pre-norm RMSNorm blocks, RoPE in the
rotate-half layout, grouped-query softmax attention, SwiGLU, optional tied embeddings), so the
weights convert by renaming keys only: no tensor is permuted, split, cast or copied.

Config fields (transformers `LlamaConfig` -> zoo `LlamaConfig`)::

    vocab_size, hidden_size, num_hidden_layers,            same name
    num_attention_heads, num_key_value_heads,
    intermediate_size, rms_norm_eps,
    max_position_embeddings, tie_word_embeddings,
    initializer_range, use_cache, dtype,
    bos_token_id, eos_token_id, pad_token_id
    rope_parameters["rope_theta"]                       -> rotary_base
    rope_parameters without rope_theta                  -> rotary_scaling (None for "default")
    attention_bias, mlp_bias                             same name (zoo settings, default False)
    head_dim                                            -> attention_head_dim (None when it is
                                                           hidden_size / num_attention_heads)
    hidden_act = "silu"                                    implied by zoo's
                                                           mixers=["attention"] * L,
                                                           channel_mixers=["swiglu"] * L,
                                                           norm_type="rmsnorm"

RoPE types "default", "linear", "yarn", "llama3" (Llama 3.x) and "longrope" convert exactly:
zoo computes the frequencies and the attention factor with transformers' own
`ROPE_INIT_FUNCTIONS` (`zoo.layers.rotary`), scales cos/sin by the factor as transformers' Llama
does, and picks longrope's long factors per call when its largest position + 1 exceeds
`original_max_position_embeddings`, as transformers does.

State dict keys (layer i; `.weight`, and `.bias` of the projections when the biases are on)::

    model.embed_tokens, model.norm, lm_head                 unchanged
    model.layers.i.self_attn.{q,k,v,o}_proj              -> model.layers.i.mixer.{q,k,v,o}_proj
    model.layers.i.mlp.{gate,up,down}_proj               -> model.layers.i.channel_mixer.*
    model.layers.i.input_layernorm                       -> model.layers.i.mixer_norm
    model.layers.i.post_attention_layernorm              -> model.layers.i.channel_norm
    *rotary_emb.inv_freq, *rotary_emb.original_inv_freq  -> dropped (zoo recomputes RoPE angles)

What cannot be mapped, refused with a `ValueError` naming the field and its value (by
`convert_checkpoint` from `config.json` alone, before any weight is read):

* from transformers: `rope_parameters["rope_type"]` "dynamic" (transformers' tables for it
  depend on the lengths of earlier calls on the module) or any type not named above, a partial
  rotary factor, an activation other than SiLU (`hidden_act`), a `model_type` other than
  "llama" (Mistral, Qwen2, ... differ in details this converter does not check, e.g. Mistral's
  sliding window), and any state dict key outside the table above (an extra module).
* from zoo: any layer whose sequence mixer is not "attention" (TNL's lightning attention, ...),
  whose channel mixer is not "swiglu" (TNL's GLU, "none"), or `norm_type` other than "rmsnorm"
  (TNL's gain-free SRMSNorm): transformers' Llama has no such layers.
* `attention_dropout` has no zoo counterpart; it only acts in training, so a nonzero value is
  dropped with a warning. zoo-only settings (`kernel_backend`, the lightning-attention fields)
  do not change an all-attention model and are not carried to transformers.

Mamba (transformers `MambaForCausalLM` <-> zoo `MambaForCausalLM`) converts by renaming keys too:
zoo's Mamba mixer keeps transformers' parameter names and shapes, and both backbones are
`x + mixer(RMSNorm(x))` blocks with a final RMSNorm. Config fields::

    vocab_size, hidden_size, num_hidden_layers,            same name
    tie_word_embeddings, initializer_range, use_cache,
    dtype, bos_token_id, eos_token_id, pad_token_id
    state_size -> mamba_d_state        conv_kernel -> mamba_d_conv
    expand -> mamba_expand             time_step_rank -> mamba_dt_rank
    layer_norm_epsilon -> rms_norm_eps use_bias -> mamba_proj_bias
    use_conv_bias -> mamba_conv_bias   time_step_min/max/floor -> mamba_dt_min/max/init_floor

State dict keys (layer i)::

    backbone.embeddings (or .embedding) <-> model.embed_tokens
    backbone.layers.i.norm              <-> model.layers.i.mixer_norm
    backbone.layers.i.mixer.*           <-> model.layers.i.mixer.*   (in_proj, conv1d, x_proj,
                                                                      dt_proj, A_log, D, out_proj)
    backbone.norm_f                     <-> model.norm
    lm_head                             <-> lm_head

Refused with a `ValueError`: a `hidden_act` other than SiLU, a non-integer `expand`, a
`model_type` other than "mamba", unknown state dict keys; from zoo, any layer that is not a
"mamba" mixer without channel mixer, or a gain-free norm. Dropped: the init-only fields
`time_step_scale`, `time_step_init_scheme` and `rescale_prenorm_residual` (a warning when not
at their defaults: a converted model is already trained), and the implementation switches
`use_mambapy` and `use_associative_scan`. `residual_in_fp32` is accepted: zoo keeps the residual
stream in the parameters' dtype, which is the same thing in fp32 and differs only by rounding
in bf16/fp16 (zoo -> transformers writes True, transformers' default).

Mixtral (transformers `MixtralForCausalLM` <-> zoo's MoE LLaMA, a `LlamaConfig` whose every
channel mixer is "moe") is LLaMA's attention and norms with the MLP replaced by a router and
stacked experts, whose layout zoo shares, so it converts by renaming keys too::

    model.layers.i.mlp.gate.weight             <-> model.layers.i.channel_mixer.gate.weight
    model.layers.i.mlp.experts.gate_up_proj    <-> model.layers.i.channel_mixer.experts.gate_up_proj
    model.layers.i.mlp.experts.down_proj       <-> model.layers.i.channel_mixer.experts.down_proj
    num_local_experts -> num_experts           intermediate_size -> moe_intermediate_size
    num_experts_per_tok, router_aux_loss_coef, output_router_logits: same name

Mixtral's router is a softmax with renormalised top-k and no z-loss (zoo's router_z_loss_coef
becomes 0). Refused: a `sliding_window` (zoo's attention is global); from zoo, a sigmoid router,
unnormalised top-k, shared experts, a capacity factor or `attention_bias=True`.
`router_jitter_noise` is dropped with a warning (training only).

Raw mamba_ssm checkpoints (`MambaLMHeadModel.save_pretrained`: state-spaces/mamba-130m ...
2.8b) convert to zoo's Mamba through the transformers path above: the keys are transformers'
but for `backbone.embedding` (accepted), and the config maps as::

    d_model -> hidden_size    n_layer -> num_hidden_layers    tie_embeddings -> tie_word_embeddings
    vocab_size, padded up to a multiple of pad_vocab_size_multiple (as MambaLMHeadModel does)
    ssm_cfg: d_state, d_conv, expand, dt_rank ("auto" = ceil(d_model / 16)), dt_min, dt_max,
             dt_init_floor, conv_bias, bias -> the transformers fields above (mamba_ssm's
             defaults where absent); dt_init, dt_scale (init only), use_fast_path: dropped
    residual_in_fp32, fused_add_norm, attn_cfg: accepted (no effect on zoo's outputs in fp32)

Refused from config.json alone, one line naming the field: `ssm_cfg.layer` other than "Mamba1"
(Mamba-2), `rms_norm=False` (LayerNorm), `d_intermediate` > 0 (an MLP), `attn_layer_idx`
(attention layers), and any field or `ssm_cfg` key not named here. Weights are read with
transformers' `load_state_dict` (torch's loader with `weights_only=True`, on the CPU): a
pickle holding anything but tensors is refused, naming the file, without running its code.

Mamba2 (transformers `Mamba2ForCausalLM` <-> zoo `Mamba2ForCausalLM`): zoo's Mamba2 mixer keeps
transformers' parameter names and shapes (`zoo.layers.mamba2`) and both backbones are `x +
mixer(RMSNorm(x))` blocks with a final RMSNorm, so the weights convert by renaming keys only: no
tensor is permuted, split, cast or copied, and converting back gives the same tensors. Config
fields::

    vocab_size, hidden_size, num_hidden_layers,            same name
    tie_word_embeddings, initializer_range, use_cache,
    dtype, bos_token_id, eos_token_id, pad_token_id
    state_size -> mamba2_d_state      head_dim -> mamba2_head_dim
    expand -> mamba2_expand           n_groups -> mamba2_n_groups
    conv_kernel -> mamba2_d_conv      use_conv_bias -> mamba2_conv_bias
    use_bias -> mamba2_proj_bias      chunk_size -> mamba2_chunk_size
    time_step_min/max/floor -> mamba2_dt_min/max/init_floor
    time_step_limit -> mamba2_dt_limit (None for transformers' default (0, inf))
    layer_norm_epsilon -> rms_norm_eps (the block norms and the gated norm share it)
    num_heads                          must equal expand · hidden_size / head_dim

State dict keys (layer i)::

    backbone.embeddings (or .embedding) <-> model.embed_tokens
    backbone.layers.i.norm              <-> model.layers.i.mixer_norm
    backbone.layers.i.mixer.*           <-> model.layers.i.mixer.*   (in_proj, conv1d, dt_bias,
                                                                      A_log, D, norm, out_proj)
    backbone.norm_f                     <-> model.norm
    lm_head                             <-> lm_head

Refused with a `ValueError` naming the field: a `model_type` other than "mamba2", a
`hidden_act` other than SiLU, `num_heads` that disagrees with the widths, unknown state dict
keys; from zoo, any layer that is not a "mamba2" mixer without a channel mixer, or a gain-free
norm. `time_step_rank` is unused by transformers' Mamba2 (no Δ projection) and dropped;
`rescale_prenorm_residual` shapes a fresh init only (a warning when on); `residual_in_fp32` is
accepted as for Mamba (the same in fp32, rounding in bf16/fp16).

`convert_checkpoint(src, dst)` converts a saved folder (safetensors), dispatching on the
`model_type` of `src/config.json` ("llama", "mixtral", "zoo_llama", "mamba", "zoo_mamba",
"mamba2" or "zoo_mamba2"), and carries the tokenizer along.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoTokenizer

from zoo.configuration import LlamaConfig, Mamba2Config, MambaConfig, ZooConfig
from zoo.convert.common import (
    ForeignFormat,
    load_converted,
    load_tensor_file,
    load_weights,
    read_config,
)
from zoo.layers.attention import attention_head_dim
from zoo.layers.mamba import dt_rank
from zoo.layers.rotary import SCALED_ROPE_TYPES
from zoo.modeling import LlamaForCausalLM, Mamba2ForCausalLM, MambaForCausalLM, ZooForCausalLM

try:  # builds the target without drawing random weights that the state dict overwrites anyway
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover - other transformers layouts
    from contextlib import nullcontext as no_init_weights

logger = logging.getLogger(__name__)

__all__ = [
    "RAW_MAMBA",
    "ConversionPlan",
    "ForeignFormat",
    "convert_checkpoint",
    "foreign_formats",
    "from_hf_llama",
    "from_hf_mamba",
    "from_hf_mamba2",
    "from_hf_mixtral",
    "from_raw_mamba",
    "is_raw_mamba_config",
    "llama_config_from_hf",
    "llama_config_to_hf",
    "llama_state_dict_from_hf",
    "llama_state_dict_to_hf",
    "load_tensor_file",
    "mamba2_config_from_hf",
    "mamba2_config_to_hf",
    "mamba2_state_dict_from_hf",
    "mamba2_state_dict_to_hf",
    "mamba_config_from_hf",
    "mamba_config_to_hf",
    "mamba_hf_config_from_raw",
    "mamba_state_dict_from_hf",
    "mamba_state_dict_to_hf",
    "mixtral_config_from_hf",
    "mixtral_config_to_hf",
    "mixtral_state_dict_from_hf",
    "mixtral_state_dict_to_hf",
    "plan_conversion",
    "resolve_source",
    "to_hf_llama",
    "to_hf_mamba",
    "to_hf_mamba2",
    "to_hf_mixtral",
]

HF_TO_ZOO = "llama->zoo_llama"
ZOO_TO_HF = "zoo_llama->llama"
MAMBA_HF_TO_ZOO = "mamba->zoo_mamba"
MAMBA_ZOO_TO_HF = "zoo_mamba->mamba"
MAMBA2_HF_TO_ZOO = "mamba2->zoo_mamba2"
MAMBA2_ZOO_TO_HF = "zoo_mamba2->mamba2"
MIXTRAL_HF_TO_ZOO = "mixtral->zoo_llama"
MIXTRAL_ZOO_TO_HF = "zoo_llama->mixtral"
SUPPORTED_MODEL_TYPES = (
    "llama", "zoo_llama", "mamba", "zoo_mamba", "mamba2", "zoo_mamba2", "mixtral",
)  # fmt: skip

# Per-layer key suffixes, transformers -> zoo (all `.weight`).
_LAYER_KEYS: dict[str, str] = {
    "self_attn.q_proj.weight": "mixer.q_proj.weight",
    "self_attn.k_proj.weight": "mixer.k_proj.weight",
    "self_attn.v_proj.weight": "mixer.v_proj.weight",
    "self_attn.o_proj.weight": "mixer.o_proj.weight",
    "mlp.gate_proj.weight": "channel_mixer.gate_proj.weight",
    "mlp.up_proj.weight": "channel_mixer.up_proj.weight",
    "mlp.down_proj.weight": "channel_mixer.down_proj.weight",
    "input_layernorm.weight": "mixer_norm.weight",
    "post_attention_layernorm.weight": "channel_norm.weight",
}
# Biases (attention_bias=True: q, k, v, o; mlp_bias=True: gate, up, down), same renames.
_LAYER_KEYS.update(
    {
        hf.replace(".weight", ".bias"): z.replace(".weight", ".bias")
        for hf, z in list(_LAYER_KEYS.items())
        if "_proj." in hf
    }
)
_LAYER_KEYS_TO_HF = {zoo_key: hf_key for hf_key, zoo_key in _LAYER_KEYS.items()}
# Mixtral: LLaMA's attention and norms, the MLP replaced by a router and stacked experts whose
# layout zoo shares (gate [E, d], gate_up_proj [E, 2f, d], down_proj [E, d, f]).
_MIXTRAL_LAYER_KEYS: dict[str, str] = {
    **{hf: z for hf, z in _LAYER_KEYS.items() if not hf.startswith("mlp.")},
    "mlp.gate.weight": "channel_mixer.gate.weight",
    "mlp.experts.gate_up_proj": "channel_mixer.experts.gate_up_proj",
    "mlp.experts.down_proj": "channel_mixer.experts.down_proj",
}
_MIXTRAL_LAYER_KEYS_TO_HF = {z: hf for hf, z in _MIXTRAL_LAYER_KEYS.items()}
_SHARED_KEYS = frozenset({"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"})
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# RoPE buffers of old transformers checkpoints (per layer) and of the current model (shared).
_ROTARY_RE = re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$")
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)


# --------------------------------------------------------------------------------------- config

# Fields that map one to one, as (zoo field, transformers field): each table serves both
# directions, so a field added here converts both ways.
_BACKBONE_FIELDS: tuple[tuple[str, str], ...] = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"),
    ("num_hidden_layers", "num_hidden_layers"),
    ("tie_word_embeddings", "tie_word_embeddings"),
    ("initializer_range", "initializer_range"),
    ("use_cache", "use_cache"),
    ("bos_token_id", "bos_token_id"),
    ("eos_token_id", "eos_token_id"),
    ("pad_token_id", "pad_token_id"),
)
_LLAMA_FIELDS = (
    *_BACKBONE_FIELDS,
    ("num_attention_heads", "num_attention_heads"),
    ("rms_norm_eps", "rms_norm_eps"),
    ("max_position_embeddings", "max_position_embeddings"),
)
_MAMBA_FIELDS = (
    *_BACKBONE_FIELDS,
    ("mamba_d_state", "state_size"),
    ("mamba_d_conv", "conv_kernel"),
    ("mamba_dt_min", "time_step_min"),
    ("mamba_dt_max", "time_step_max"),
    ("mamba_dt_init_floor", "time_step_floor"),
    ("mamba_conv_bias", "use_conv_bias"),
    ("mamba_proj_bias", "use_bias"),
    ("rms_norm_eps", "layer_norm_epsilon"),
)
# Defaults of optional transformers fields (a config from an older version may lack them).
_HF_DEFAULTS = {"use_cache": True}


def _from_hf(hf_config: Any, table: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    fields = {
        zoo: getattr(hf_config, hf) if hasattr(hf_config, hf) else _HF_DEFAULTS[hf]
        for zoo, hf in table
    }
    return {**fields, "dtype": getattr(hf_config, "dtype", None)}


def _to_hf(config: ZooConfig, table: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return {hf: getattr(config, zoo) for zoo, hf in table} | {
        "dtype": getattr(config, "dtype", None)
    }


# RoPE types zoo's attention implements (with transformers' ROPE_INIT_FUNCTIONS' numbers).
_ROPE_TYPES = ("default", *SCALED_ROPE_TYPES)


def _rope_from_hf(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rotary_base, rotary_scaling) of a transformers Llama config; refuses the RoPE types
    zoo lacks ("dynamic", ...) and a partial rotary factor."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # transformers 4 layout
        params = {"rope_theta": getattr(hf_config, "rope_theta", 10000.0)}
        scaling = getattr(hf_config, "rope_scaling", None)
        if scaling:
            params.update(scaling)
    if not isinstance(params, Mapping) or ("rope_theta" not in params and params):
        raise ValueError(
            f"rope_parameters={params!r} is not a single RoPE setting with a rope_theta; zoo's "
            "attention takes one RoPE for all layers"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(
            f"rope_parameters['rope_type']={rope_type!r} cannot be converted: zoo's attention "
            f"implements {list(_ROPE_TYPES)} (transformers' dynamic RoPE depends on the lengths "
            "of earlier calls and is not supported)"
        )
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    if partial is not None and partial != 1.0:
        raise ValueError(
            f"partial_rotary_factor={partial!r} cannot be converted: zoo rotates the whole head"
        )
    base = float(params.get("rope_theta", 10000.0))
    if rope_type == "default":
        return base, None
    dropped = {"rope_theta", "type", "partial_rotary_factor"}
    scaling = {k: v for k, v in params.items() if k not in dropped}
    return base, {**scaling, "rope_type": rope_type}


def _llama_fields_from_hf(hf_config: Any) -> dict[str, Any]:
    """zoo config fields of the LLaMA parts of a transformers Llama or Mixtral config."""
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers maps both names to SiLU
        raise ValueError(
            f"hidden_act={act!r} cannot be converted: zoo's SwiGLU channel mixer uses 'silu'"
        )
    natural_head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None)
    rotary_base, rotary_scaling = _rope_from_hf(hf_config)
    dropout = getattr(hf_config, "attention_dropout", 0.0) or 0.0
    if dropout:
        logger.warning(
            "attention_dropout=%s has no zoo counterpart and is dropped (it only acts in training)",
            dropout,
        )
    num_kv = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    return {
        **_from_hf(hf_config, _LLAMA_FIELDS),
        "num_key_value_heads": num_kv,
        "intermediate_size": hf_config.intermediate_size,
        "rotary_base": rotary_base,
        "rotary_scaling": rotary_scaling,
        "attention_head_dim": (
            None if head_dim is None or head_dim == natural_head_dim else int(head_dim)
        ),
        "attention_bias": bool(getattr(hf_config, "attention_bias", False)),
    }


def _check_model_type(hf_config: Any, expected: str, function: str) -> None:
    model_type = getattr(hf_config, "model_type", None)
    if model_type != expected:
        raise ValueError(
            f"model_type={model_type!r}: {function} converts transformers "
            f"{expected.capitalize()} configs (model_type={expected!r}) only"
        )


def llama_config_from_hf(hf_config: transformers.LlamaConfig) -> LlamaConfig:
    """zoo's `LlamaConfig` for a transformers `LlamaConfig`; `ValueError` for what zoo lacks."""
    _check_model_type(hf_config, "llama", "llama_config_from_hf")
    return LlamaConfig(
        **_llama_fields_from_hf(hf_config), mlp_bias=bool(getattr(hf_config, "mlp_bias", False))
    )


def mixtral_config_from_hf(hf_config: transformers.MixtralConfig) -> LlamaConfig:
    """zoo's MoE LLaMA (`LlamaConfig`, every channel mixer "moe") for a transformers
    `MixtralConfig`; `ValueError` for what zoo lacks."""
    _check_model_type(hf_config, "mixtral", "mixtral_config_from_hf")
    window = getattr(hf_config, "sliding_window", None)
    if window is not None:
        raise ValueError(
            f"sliding_window={window!r} cannot be converted: zoo's attention is global "
            "(sliding_window=None)"
        )
    jitter = getattr(hf_config, "router_jitter_noise", 0.0) or 0.0
    if jitter:
        logger.warning(
            "router_jitter_noise=%s has no zoo counterpart and is dropped (training only)", jitter
        )
    fields = _llama_fields_from_hf(hf_config)
    if fields["attention_bias"]:
        raise ValueError(
            "attention_bias=True cannot be converted from a Mixtral: transformers' Mixtral "
            "attention has no biases"
        )
    return LlamaConfig(
        **fields,
        channel_mixers=["moe"] * fields["num_hidden_layers"],
        num_experts=hf_config.num_local_experts,
        num_experts_per_tok=hf_config.num_experts_per_tok,
        moe_intermediate_size=hf_config.intermediate_size,
        router_scoring_func="softmax",
        norm_topk_prob=True,
        router_aux_loss_coef=float(hf_config.router_aux_loss_coef),
        router_z_loss_coef=0.0,  # Mixtral trains without one; keep the same objective
        output_router_logits=bool(getattr(hf_config, "output_router_logits", False)),
    )


def _require_uniform(config: ZooConfig, mixer: str, channel_mixer: str, target: str) -> None:
    """Refuse a zoo config that a transformers `target` model cannot hold, naming the field."""
    for field, allowed in (("mixers", mixer), ("channel_mixers", channel_mixer)):
        for i, name in enumerate(getattr(config, field)):
            if name != allowed:
                raise ValueError(
                    f"{field}[{i}]={name!r} cannot be converted to a transformers {target}: every "
                    f"layer must be {allowed!r} (got {field}={getattr(config, field)!r})"
                )
    if config.norm_type != "rmsnorm":
        raise ValueError(
            f"norm_type={config.norm_type!r} cannot be converted to a transformers {target}, "
            "whose norms are 'rmsnorm' (with a gain)"
        )


def _llama_fields_to_hf(config: ZooConfig) -> dict[str, Any]:
    return {
        **_to_hf(config, _LLAMA_FIELDS),
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": attention_head_dim(config),
        "hidden_act": "silu",
        "rope_parameters": {
            **(config.rotary_scaling or {"rope_type": "default"}),
            "rope_theta": float(config.rotary_base),
        },
    }


def llama_config_to_hf(config: ZooConfig) -> transformers.LlamaConfig:
    """transformers' `LlamaConfig` for a zoo config whose every layer is LLaMA's."""
    _require_uniform(config, "attention", "swiglu", "Llama")
    return transformers.LlamaConfig(
        **_llama_fields_to_hf(config),
        intermediate_size=config.intermediate_size,
        attention_bias=bool(config.attention_bias),
        mlp_bias=bool(config.mlp_bias),
    )


def mixtral_config_to_hf(config: ZooConfig) -> transformers.MixtralConfig:
    """transformers' `MixtralConfig` for a zoo MoE LLaMA (attention + "moe" in every layer)."""
    _require_uniform(config, "attention", "moe", "Mixtral")
    for field, allowed in (
        ("router_scoring_func", "softmax"),
        ("norm_topk_prob", True),
        ("num_shared_experts", 0),
        ("moe_capacity_factor", None),
        ("attention_bias", False),
    ):
        if getattr(config, field) != allowed:
            raise ValueError(
                f"{field}={getattr(config, field)!r} cannot be converted to a transformers "
                f"Mixtral, whose router needs {field}={allowed!r}"
            )
    if config.router_z_loss_coef:
        logger.warning(
            "router_z_loss_coef=%s has no Mixtral counterpart and is dropped (training only)",
            config.router_z_loss_coef,
        )
    return transformers.MixtralConfig(
        **_llama_fields_to_hf(config),
        intermediate_size=config.moe_intermediate_size,
        num_local_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        router_aux_loss_coef=float(config.router_aux_loss_coef),
        output_router_logits=bool(config.output_router_logits),
        router_jitter_noise=0.0,
        sliding_window=None,
    )


# ----------------------------------------------------------------------------------- state dict


def _rename(
    state_dict: Mapping[str, torch.Tensor],
    layer_keys: Mapping[str, str],
    source: str,
    model: str = "LlamaForCausalLM",
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if _ROTARY_RE.search(key):
            continue
        if key in _SHARED_KEYS:
            new_key = key
        else:
            match = _LAYER_RE.match(key)
            if match is None or match.group(2) not in layer_keys:
                raise ValueError(
                    f"state dict key {key!r} is not part of a {source} {model}; "
                    f"known keys: {sorted(_SHARED_KEYS)} and model.layers.<i>.<one of "
                    f"{sorted(layer_keys)}>"
                )
            new_key = f"model.layers.{match.group(1)}.{layer_keys[match.group(2)]}"
        out[new_key] = tensor
    return out


def llama_state_dict_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers LlamaForCausalLM state dict to zoo's keys (same tensors)."""
    return _rename(state_dict, _LAYER_KEYS, "transformers")


def llama_state_dict_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a zoo LlamaForCausalLM state dict to transformers' keys (same tensors)."""
    return _rename(state_dict, _LAYER_KEYS_TO_HF, "zoo")


def mixtral_state_dict_from_hf(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Rename a transformers MixtralForCausalLM state dict to zoo's keys (same tensors)."""
    return _rename(state_dict, _MIXTRAL_LAYER_KEYS, "transformers", "MixtralForCausalLM")


def mixtral_state_dict_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a zoo MoE LLaMA state dict to transformers Mixtral's keys (same tensors)."""
    return _rename(state_dict, _MIXTRAL_LAYER_KEYS_TO_HF, "zoo", "MoE LLaMA")


# ------------------------------------------------------------------------------------- modules


def _load_into(
    target: torch.nn.Module, source: torch.nn.Module, state_dict: dict[str, torch.Tensor]
) -> None:
    """Move `target` to `source`'s device and dtype, then load `state_dict` strictly."""
    param = next(source.parameters())
    target.to(device=param.device, dtype=param.dtype)
    if target.config.tie_word_embeddings and _HEAD not in state_dict and _EMBED in state_dict:
        # A tied model saved without its head (or a state dict with the duplicate removed).
        state_dict[_HEAD] = state_dict[_EMBED]
    target.load_state_dict(state_dict, strict=True)
    if target.config.tie_word_embeddings:
        target.tie_weights()
    generation_config = getattr(source, "generation_config", None)
    if generation_config is not None:
        target.generation_config = copy.deepcopy(generation_config)
    target.train(source.training)


def _converted(
    model_class: type[torch.nn.Module],
    config: Any,
    source: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
) -> torch.nn.Module:
    """A `model_class(config)` holding `state_dict`, on `source`'s device and dtype."""
    with no_init_weights():  # no random init of weights the state dict overwrites anyway
        target = model_class(config)
    _load_into(target, source, state_dict)
    return target


def from_hf_llama(hf_model: transformers.LlamaForCausalLM) -> LlamaForCausalLM:
    """zoo's `LlamaForCausalLM` with the weights of a transformers `LlamaForCausalLM`."""
    config = llama_config_from_hf(hf_model.config)
    state_dict = llama_state_dict_from_hf(hf_model.state_dict())
    return _converted(LlamaForCausalLM, config, hf_model, state_dict)


def to_hf_llama(model: ZooForCausalLM) -> transformers.LlamaForCausalLM:
    """transformers' `LlamaForCausalLM` with the weights of a zoo LLaMA (`LlamaForCausalLM`)."""
    config = llama_config_to_hf(model.config)
    state_dict = llama_state_dict_to_hf(model.state_dict())
    return _converted(transformers.LlamaForCausalLM, config, model, state_dict)


def from_hf_mixtral(hf_model: transformers.MixtralForCausalLM) -> LlamaForCausalLM:
    """zoo's MoE LLaMA with the weights of a transformers `MixtralForCausalLM`."""
    config = mixtral_config_from_hf(hf_model.config)
    state_dict = mixtral_state_dict_from_hf(hf_model.state_dict())
    return _converted(LlamaForCausalLM, config, hf_model, state_dict)


def to_hf_mixtral(model: ZooForCausalLM) -> transformers.MixtralForCausalLM:
    """transformers' `MixtralForCausalLM` with the weights of a zoo MoE LLaMA."""
    config = mixtral_config_to_hf(model.config)
    state_dict = mixtral_state_dict_to_hf(model.state_dict())
    return _converted(transformers.MixtralForCausalLM, config, model, state_dict)


# ---------------------------------------------------------------------------------------- Mamba

# Mixer parameters, the same names in transformers' MambaMixer and zoo's (biases when enabled).
_MAMBA_MIXER_KEYS = frozenset(
    {
        "in_proj.weight",
        "in_proj.bias",
        "conv1d.weight",
        "conv1d.bias",
        "x_proj.weight",
        "dt_proj.weight",
        "dt_proj.bias",
        "A_log",
        "D",
        "out_proj.weight",
        "out_proj.bias",
    }
)
# Keys outside the layers, transformers -> zoo; released mamba_ssm checkpoints say "embedding".
_MAMBA_SHARED_KEYS = {
    "backbone.embeddings.weight": _EMBED,
    "backbone.embedding.weight": _EMBED,
    "backbone.norm_f.weight": "model.norm.weight",
    _HEAD: _HEAD,
}
_MAMBA_SHARED_KEYS_TO_HF = {
    _EMBED: "backbone.embeddings.weight",
    "model.norm.weight": "backbone.norm_f.weight",
    _HEAD: _HEAD,
}
_HF_MAMBA_LAYER_RE = re.compile(r"^backbone\.layers\.(\d+)\.(norm\.weight|mixer\.(.+))$")
_ZOO_MAMBA_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(mixer_norm\.weight|mixer\.(.+))$")
# transformers fields that only shape a fresh init, with their defaults.
_MAMBA_INIT_ONLY = {
    "time_step_scale": 1.0,
    "time_step_init_scheme": "random",
    "rescale_prenorm_residual": False,
}


def mamba_config_from_hf(hf_config: transformers.MambaConfig) -> MambaConfig:
    """zoo's `MambaConfig` for a transformers `MambaConfig`; `ValueError` for what zoo lacks."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "mamba":
        raise ValueError(
            f"model_type={model_type!r}: mamba_config_from_hf converts transformers Mamba configs "
            "(model_type='mamba') only"
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(
            f"hidden_act={act!r} cannot be converted: zoo's Mamba mixer uses SiLU ('silu')"
        )
    expand = hf_config.expand
    if not float(expand).is_integer() or expand < 1:
        raise ValueError(
            f"expand={expand!r} cannot be converted: zoo's mamba_expand is a positive integer"
        )
    for field, default in _MAMBA_INIT_ONLY.items():
        value = getattr(hf_config, field, default)
        if value != default:
            logger.warning(
                "%s=%r only shapes a fresh init and has no zoo counterpart; dropped", field, value
            )
    return MambaConfig(
        **_from_hf(hf_config, _MAMBA_FIELDS),
        num_attention_heads=1,  # no attention in a pure Mamba; 1 divides any width
        mamba_expand=int(expand),
        mamba_dt_rank=int(hf_config.time_step_rank),
    )


def mamba_config_to_hf(config: ZooConfig) -> transformers.MambaConfig:
    """transformers' `MambaConfig` for a zoo config whose every layer is a Mamba block."""
    _require_uniform(config, "mamba", "none", "Mamba")
    return transformers.MambaConfig(
        **_to_hf(config, _MAMBA_FIELDS),
        expand=config.mamba_expand,
        time_step_rank=dt_rank(config),
        hidden_act="silu",
        residual_in_fp32=True,
    )


def _rename_mamba(
    state_dict: Mapping[str, torch.Tensor],
    to_hf: bool,
    mixer_keys: frozenset[str] = _MAMBA_MIXER_KEYS,
    model: str = "MambaForCausalLM",
) -> dict[str, torch.Tensor]:
    """Rename the keys of a Mamba-style state dict (transformers' `backbone.*` <-> zoo's
    `model.*`; Mamba and Mamba2 share the layout) without touching a tensor; a key outside the
    layout or a mixer key outside `mixer_keys` is a `ValueError` naming it."""
    if to_hf:
        shared, layer_re, layer_prefix = _MAMBA_SHARED_KEYS_TO_HF, _ZOO_MAMBA_LAYER_RE, "backbone"
        norm_key, source = "norm.weight", "zoo"
    else:
        shared, layer_re, layer_prefix = _MAMBA_SHARED_KEYS, _HF_MAMBA_LAYER_RE, "model"
        norm_key, source = "mixer_norm.weight", "transformers"
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in shared:
            out[shared[key]] = tensor
            continue
        match = layer_re.match(key)
        if match is None or (match.group(3) is not None and match.group(3) not in mixer_keys):
            raise ValueError(
                f"state dict key {key!r} is not part of a {source} {model}; known keys: "
                f"{sorted(shared)} and {layer_re.pattern} with mixer.<one of "
                f"{sorted(mixer_keys)}>"
            )
        leaf = norm_key if match.group(3) is None else f"mixer.{match.group(3)}"
        out[f"{layer_prefix}.layers.{match.group(1)}.{leaf}"] = tensor
    return out


def mamba_state_dict_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers MambaForCausalLM state dict to zoo's keys (same tensors)."""
    return _rename_mamba(state_dict, to_hf=False)


def mamba_state_dict_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a zoo MambaForCausalLM state dict to transformers' keys (same tensors)."""
    return _rename_mamba(state_dict, to_hf=True)


def from_hf_mamba(hf_model: transformers.MambaForCausalLM) -> MambaForCausalLM:
    """zoo's `MambaForCausalLM` with the weights of a transformers `MambaForCausalLM`."""
    config = mamba_config_from_hf(hf_model.config)
    state_dict = mamba_state_dict_from_hf(hf_model.state_dict())
    return _converted(MambaForCausalLM, config, hf_model, state_dict)


def to_hf_mamba(model: ZooForCausalLM) -> transformers.MambaForCausalLM:
    """transformers' `MambaForCausalLM` with the weights of a zoo Mamba (`MambaForCausalLM`)."""
    config = mamba_config_to_hf(model.config)
    state_dict = mamba_state_dict_to_hf(model.state_dict())
    return _converted(transformers.MambaForCausalLM, config, model, state_dict)


# --------------------------------------------------------------------------------------- Mamba2

_MAMBA2_FIELDS = (
    *_BACKBONE_FIELDS,
    ("mamba2_d_state", "state_size"),
    ("mamba2_head_dim", "head_dim"),
    ("mamba2_n_groups", "n_groups"),
    ("mamba2_d_conv", "conv_kernel"),
    ("mamba2_conv_bias", "use_conv_bias"),
    ("mamba2_proj_bias", "use_bias"),
    ("mamba2_chunk_size", "chunk_size"),
    ("mamba2_dt_min", "time_step_min"),
    ("mamba2_dt_max", "time_step_max"),
    ("mamba2_dt_init_floor", "time_step_floor"),
    ("rms_norm_eps", "layer_norm_epsilon"),
)
# Mixer parameters, the same names in transformers' Mamba2Mixer and zoo's (biases when enabled).
_MAMBA2_MIXER_KEYS = frozenset(
    {
        "in_proj.weight",
        "in_proj.bias",
        "conv1d.weight",
        "conv1d.bias",
        "dt_bias",
        "A_log",
        "D",
        "norm.weight",
        "out_proj.weight",
        "out_proj.bias",
    }
)
_MAMBA2 = "Mamba2ForCausalLM"


def mamba2_config_from_hf(hf_config: transformers.Mamba2Config) -> Mamba2Config:
    """zoo's `Mamba2Config` for a transformers `Mamba2Config`; `ValueError` for what zoo lacks."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "mamba2":
        raise ValueError(
            f"model_type={model_type!r}: mamba2_config_from_hf converts transformers Mamba2 "
            "configs (model_type='mamba2') only"
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={act!r} cannot be converted: zoo's Mamba2 uses SiLU")
    expand = hf_config.expand  # an int: transformers' config validates it
    heads = expand * hf_config.hidden_size / hf_config.head_dim
    if hf_config.num_heads != heads:
        raise ValueError(
            f"num_heads={hf_config.num_heads} cannot be converted: zoo's Mamba2 has expand · "
            f"hidden_size / head_dim = {heads:g} heads"
        )
    if getattr(hf_config, "rescale_prenorm_residual", False):
        logger.warning("rescale_prenorm_residual=True only shapes a fresh init; dropped")
    low, high = (float(v) for v in getattr(hf_config, "time_step_limit", (0.0, math.inf)))
    return Mamba2Config(
        **_from_hf(hf_config, _MAMBA2_FIELDS),
        num_attention_heads=1,  # no attention in a pure Mamba2; 1 divides any width
        mamba2_expand=expand,
        mamba2_dt_limit=None if (low, high) == (0.0, math.inf) else [low, high],
    )


def mamba2_config_to_hf(config: ZooConfig) -> transformers.Mamba2Config:
    """transformers' `Mamba2Config` for a zoo config whose every layer is a Mamba2 block."""
    _require_uniform(config, "mamba2", "none", "Mamba2")
    limit = config.mamba2_dt_limit
    return transformers.Mamba2Config(
        **_to_hf(config, _MAMBA2_FIELDS),
        expand=config.mamba2_expand,
        num_heads=config.mamba2_expand * config.hidden_size // config.mamba2_head_dim,
        time_step_limit=(0.0, math.inf) if limit is None else tuple(limit),
        hidden_act="silu",
        residual_in_fp32=True,
    )


def mamba2_state_dict_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers Mamba2ForCausalLM state dict to zoo's keys (same tensors)."""
    return _rename_mamba(state_dict, to_hf=False, mixer_keys=_MAMBA2_MIXER_KEYS, model=_MAMBA2)


def mamba2_state_dict_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a zoo Mamba2 state dict to transformers' keys (same tensors)."""
    return _rename_mamba(state_dict, to_hf=True, mixer_keys=_MAMBA2_MIXER_KEYS, model=_MAMBA2)


def from_hf_mamba2(hf_model: transformers.Mamba2ForCausalLM) -> Mamba2ForCausalLM:
    """zoo's `Mamba2ForCausalLM` with the weights of a transformers `Mamba2ForCausalLM`."""
    config = mamba2_config_from_hf(hf_model.config)
    state_dict = mamba2_state_dict_from_hf(hf_model.state_dict())
    return _converted(Mamba2ForCausalLM, config, hf_model, state_dict)


def to_hf_mamba2(model: ZooForCausalLM) -> transformers.Mamba2ForCausalLM:
    """transformers' `Mamba2ForCausalLM` with the weights of a zoo Mamba2."""
    config = mamba2_config_to_hf(model.config)
    state_dict = mamba2_state_dict_to_hf(model.state_dict())
    return _converted(transformers.Mamba2ForCausalLM, config, model, state_dict)


# ------------------------------------------------------------------------- raw mamba_ssm Mamba

MAMBA_RAW_TO_ZOO = "mamba_ssm->zoo_mamba"
# mamba_ssm's `MambaConfig` fields (config_mamba.py) that the zoo expresses, with the values it
# needs where it needs one; `rms_norm`, `d_intermediate` and `attn_layer_idx` are checked below.
_RAW_IMPLEMENTATION_FIELDS = ("residual_in_fp32", "fused_add_norm", "attn_cfg")
_RAW_METADATA = ("architectures", "transformers_version", "torch_dtype", "dtype")
# mamba_ssm's `Mamba` mixer arguments (`ssm_cfg`, mamba_simple.py) -> transformers MambaConfig.
_RAW_SSM_FIELDS = {
    "d_state": "state_size",
    "d_conv": "conv_kernel",
    "expand": "expand",
    "dt_rank": "time_step_rank",
    "dt_min": "time_step_min",
    "dt_max": "time_step_max",
    "dt_init_floor": "time_step_floor",
    "conv_bias": "use_conv_bias",
    "bias": "use_bias",
}
# mamba_ssm's mixer defaults (a released config.json usually has `ssm_cfg: {}`).
_RAW_SSM_DEFAULTS = {
    "d_state": 16,
    "d_conv": 4,
    "expand": 2,
    "dt_rank": "auto",
    "dt_min": 0.001,
    "dt_max": 0.1,
    "dt_init_floor": 1e-4,
    "conv_bias": True,
    "bias": False,
}
# Init-only or implementation switches of the mixer: no effect on a trained model's outputs.
_RAW_SSM_IGNORED = ("dt_init", "dt_scale", "use_fast_path")


def is_raw_mamba_config(fields: Mapping[str, Any]) -> bool:
    """Whether a config.json is mamba_ssm's own (state-spaces/mamba-*): d_model and n_layer, no
    model_type."""
    return (
        "model_type" not in fields
        and "d_model" in fields
        and "n_layer" in fields
        and "layer" not in fields  # safari's LM configs (d_model, n_layer and a layer dict)
    )


def _refuse_raw(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"mamba_ssm config field {field}={value!r} cannot be converted: {why}")


def mamba_hf_config_from_raw(fields: Mapping[str, Any]) -> transformers.MambaConfig:
    """transformers' `MambaConfig` for a mamba_ssm config.json (`MambaLMHeadModel`); a one-line
    `ValueError` naming the field for what zoo's Mamba cannot express."""
    ssm_cfg = fields.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, Mapping):
        raise _refuse_raw("ssm_cfg", ssm_cfg, "expected a dict of Mamba mixer arguments")
    layer = ssm_cfg.get("layer", "Mamba1")
    if layer != "Mamba1":
        raise _refuse_raw("ssm_cfg.layer", layer, "zoo's Mamba family is Mamba-1 only")
    checks = (
        ("rms_norm", True, "zoo's Mamba blocks use RMSNorm (False means LayerNorm)"),
        ("d_intermediate", 0, "zoo's Mamba blocks have no MLP after the mixer"),
        ("attn_layer_idx", [], "zoo's Mamba family has no attention layers"),
    )
    for field, allowed, why in checks:
        value = fields.get(field, allowed)
        if value != allowed and not (field == "attn_layer_idx" and not value):
            raise _refuse_raw(field, value, why)
    known = {
        "d_model",
        "n_layer",
        "vocab_size",
        "ssm_cfg",
        "pad_vocab_size_multiple",
        "tie_embeddings",
        "norm_epsilon",
        *(field for field, _, _ in checks),
        *_RAW_IMPLEMENTATION_FIELDS,
        *_RAW_METADATA,
    }
    for field in fields:
        if field not in known and not field.startswith("_"):
            raise _refuse_raw(field, fields[field], "not a field this converter knows")
    for field in ssm_cfg:
        if field not in _RAW_SSM_FIELDS and field not in (*_RAW_SSM_IGNORED, "layer"):
            raise _refuse_raw(f"ssm_cfg.{field}", ssm_cfg[field], "zoo's Mamba mixer lacks it")
    ssm = {**_RAW_SSM_DEFAULTS, **{k: v for k, v in ssm_cfg.items() if k in _RAW_SSM_FIELDS}}
    d_model, vocab_size = int(fields["d_model"]), int(fields["vocab_size"])
    if ssm["dt_rank"] == "auto":
        ssm["dt_rank"] = -(-d_model // 16)  # mamba_ssm's math.ceil(d_model / 16)
    multiple = int(fields.get("pad_vocab_size_multiple", 8) or 1)
    if vocab_size % multiple:  # MambaLMHeadModel pads the vocabulary the same way
        vocab_size += multiple - vocab_size % multiple
    return transformers.MambaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        num_hidden_layers=int(fields["n_layer"]),
        layer_norm_epsilon=float(fields.get("norm_epsilon", 1e-5)),  # MixerModel's default
        tie_word_embeddings=bool(fields.get("tie_embeddings", True)),
        residual_in_fp32=bool(fields.get("residual_in_fp32", True)),
        hidden_act="silu",
        **{_RAW_SSM_FIELDS[k]: v for k, v in ssm.items()},
    )


def from_raw_mamba(src: str | Path) -> MambaForCausalLM:
    """zoo's `MambaForCausalLM` from a mamba_ssm `MambaLMHeadModel.save_pretrained` folder
    (state-spaces/mamba-130m, ...): config.json in mamba_ssm's schema and pytorch_model.bin
    (or model.safetensors). The config is checked before any weight is read."""
    config = _raw_mamba_config(read_config(src))
    state_dict = mamba_state_dict_from_hf(load_weights(src))
    return load_converted(
        MambaForCausalLM, config, state_dict, src, embed_name="backbone.embedding.weight"
    )


def _raw_mamba_config(fields: Mapping[str, Any]) -> MambaConfig:
    return mamba_config_from_hf(mamba_hf_config_from_raw(fields))


RAW_MAMBA = ForeignFormat(
    "mamba_ssm", "zoo_mamba", is_raw_mamba_config, _raw_mamba_config, from_raw_mamba
)

# The released formats of other projects, each in its own module (imported when first asked).
_FOREIGN_MODULES = ("transnormer", "fla_hgrn2", "fla_gla", "fla_gated_deltanet", "safari_hyena")


def foreign_formats() -> tuple[ForeignFormat, ...]:
    """Every released checkpoint format `convert_checkpoint` recognises besides transformers'."""
    import importlib

    found = [RAW_MAMBA]
    for name in _FOREIGN_MODULES:
        try:
            module = importlib.import_module(f"zoo.convert.{name}")
        except ModuleNotFoundError as error:  # a converter still being written
            if error.name != f"zoo.convert.{name}":
                raise
            continue
        found.append(module.FORMAT)
    return tuple(found)


# ---------------------------------------------------------------------------------- checkpoints


# Files a conversion reads from the Hub: the config first (checked before anything else), then
# the weights, their index and the tokenizer's files.
_HUB_CONFIG = "config.json"
_HUB_FILES = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken")


def _zoo_source(src: str | Path) -> ZooConfig:
    """The zoo config of a zoo checkpoint folder (the zoo -> transformers directions)."""
    return transformers.AutoConfig.from_pretrained(src)


def _plan(src: Path, fields: Mapping[str, Any]) -> tuple[str, ZooConfig, ForeignFormat | None]:
    """(direction, the zoo side's config, the foreign format if any) of converting `src`, from
    its config.json alone: what cannot be converted is refused here, before any weight is read."""
    for fmt in foreign_formats():  # another project's own folder (state-spaces/mamba-*, ...)
        if fmt.matches(fields):
            return fmt.direction, fmt.config(fields), fmt
    model_type = fields.get("model_type")
    if model_type == "llama":
        return HF_TO_ZOO, llama_config_from_hf(transformers.AutoConfig.from_pretrained(src)), None
    if model_type == "mixtral":
        config = mixtral_config_from_hf(transformers.AutoConfig.from_pretrained(src))
        return MIXTRAL_HF_TO_ZOO, config, None
    if model_type == "mamba":
        return (
            MAMBA_HF_TO_ZOO,
            mamba_config_from_hf(transformers.MambaConfig.from_pretrained(src)),
            None,
        )
    if model_type == "zoo_llama" and "moe" in (fields.get("channel_mixers") or []):
        return MIXTRAL_ZOO_TO_HF, _zoo_source(src), None
    if model_type == "zoo_llama":
        return ZOO_TO_HF, _zoo_source(src), None
    if model_type == "zoo_mamba":
        return MAMBA_ZOO_TO_HF, _zoo_source(src), None
    if model_type == "mamba2":
        config = mamba2_config_from_hf(transformers.Mamba2Config.from_pretrained(src))
        return MAMBA2_HF_TO_ZOO, config, None
    if model_type == "zoo_mamba2":
        return MAMBA2_ZOO_TO_HF, _zoo_source(src), None
    foreign = ", ".join(repr(fmt.name) for fmt in foreign_formats())
    raise ValueError(
        f"model_type={model_type!r} in {src / 'config.json'} has no converter; supported: "
        "'llama', 'mixtral', 'mamba' and 'mamba2' (transformers -> zoo), 'zoo_llama', "
        f"'zoo_mamba' and 'zoo_mamba2' (zoo -> transformers), and the released formats {foreign}"
    )


def _is_hub_id(src: str | Path) -> bool:
    text = str(src)
    return not Path(text).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None


def resolve_source(src: str | Path, *, config_only: bool = False) -> Path:
    """A local checkpoint folder for `src`: the folder itself, or for a Hub id ("org/name") the
    Hub's copy in the huggingface_hub cache (downloaded when not cached; `HF_HUB_OFFLINE=1`
    uses the cache only). With `config_only`, only config.json is fetched."""
    if not _is_hub_id(src):
        return Path(src)
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        if config_only:
            return Path(hf_hub_download(str(src), _HUB_CONFIG)).parent
        return Path(snapshot_download(str(src), allow_patterns=list(_HUB_FILES)))
    except (EntryNotFoundError, OSError) as error:  # HTTP errors, offline, not cached, ...
        raise FileNotFoundError(
            f"{src}: not a local folder, and the Hub has no such model or cannot be reached "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error


def _read_fields(src: Path) -> dict[str, Any]:
    config_file = src / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no checkpoint config at {config_file} (looked for config.json)")
    return json.loads(config_file.read_text())


@dataclass(frozen=True)
class ConversionPlan:
    """What converting a checkpoint gives, counted from its config.json alone on the meta
    device (no weight is read): parameters, the decode state of one sequence after `seq_len`
    tokens and the forward FLOPs per token at that context (`zoo.flops.model_flops`)."""

    direction: str
    config: ZooConfig
    parameters: int
    seq_len: int
    state_elements: int
    state_bytes: int
    forward_flops_per_token: int

    def table(self) -> str:
        rows = [
            ("direction", self.direction),
            ("parameters", f"{self.parameters:,}"),
            (f"decode state after {self.seq_len:,} tokens",
             f"{self.state_elements:,} elements ({self.state_bytes / 2**20:,.1f} MiB)"),
            (f"forward FLOPs per token at {self.seq_len:,}", f"{self.forward_flops_per_token:,}"),
        ]  # fmt: skip
        return "\n".join(f"{name}: {value}" for name, value in rows)


def plan_conversion(src: str | Path, seq_len: int = 2048) -> ConversionPlan:
    """Check that `src` (a folder or a Hub id: only its config.json is fetched) converts, and
    count the result on the meta device. Refusals are the ones `convert_checkpoint` makes."""
    from zoo.flops import model_flops

    folder = resolve_source(src, config_only=True)
    direction, config, _ = _plan(folder, _read_fields(folder))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    # The checkpoint's dtype: a torch.dtype, its name ("bfloat16"), or nothing / "auto" (fp32).
    dtype = (
        config.dtype
        if isinstance(config.dtype, torch.dtype)
        else getattr(torch, str(config.dtype), None)
    )
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float32
    state = model.state_size(1, seq_len)
    return ConversionPlan(
        direction=direction,
        config=config,
        parameters=model.num_parameters(),
        seq_len=seq_len,
        state_elements=state,
        state_bytes=state * dtype.itemsize,
        forward_flops_per_token=model_flops(model, seq_len).forward_per_token,
    )


def convert_checkpoint(src: str | Path, dst: str | Path) -> str:
    """Convert the checkpoint `src` (a folder, or a Hub id "org/name" fetched through
    huggingface_hub: config.json first, the weights only once it is accepted) into the folder
    `dst`; returns the direction converted.

    `src/config.json` picks the direction: "llama" / "mixtral" / "mamba" / "mamba2" (a
    transformers model) writes a zoo checkpoint; "zoo_llama" writes a transformers Llama, or a
    Mixtral when its channel mixers are MoE layers, "zoo_mamba" a transformers Mamba and
    "zoo_mamba2" a transformers Mamba2; all with
    `save_pretrained` (safetensors), in the checkpoint's dtype, weights read from safetensors
    only. The released formats of other projects (`foreign_formats()`: mamba_ssm's raw Mamba,
    TransNormerLLM, fla's HGRN2, safari's Hyena) convert to the zoo family that expresses them,
    their weights read as tensors only (`weights_only=True`). A tokenizer in `src` is loaded with
    `AutoTokenizer` and saved into `dst`. What cannot be converted is refused from config.json
    alone, before any weight is read. Returns e.g. "llama->zoo_llama", "zoo_llama->mixtral",
    "mamba_ssm->zoo_mamba", "transnormer->zoo_tnl".
    """
    dst = Path(dst)
    folder = resolve_source(src, config_only=True)
    fields = _read_fields(folder)
    if dst.exists() and dst.resolve() == folder.resolve():
        raise ValueError(f"dst {dst} is the source folder; convert into a different folder")
    direction, _, foreign = _plan(folder, fields)
    folder = resolve_source(src)  # the weights, now that the config is accepted
    load = {"dtype": "auto", "use_safetensors": True}
    if foreign is not None:
        target = foreign.load(folder)
    elif direction == HF_TO_ZOO:
        target = from_hf_llama(transformers.LlamaForCausalLM.from_pretrained(folder, **load))
    elif direction == MIXTRAL_HF_TO_ZOO:
        target = from_hf_mixtral(transformers.MixtralForCausalLM.from_pretrained(folder, **load))
    elif direction == MAMBA_HF_TO_ZOO:
        target = from_hf_mamba(transformers.MambaForCausalLM.from_pretrained(folder, **load))
    elif direction == MIXTRAL_ZOO_TO_HF:
        target = to_hf_mixtral(LlamaForCausalLM.from_pretrained(folder, **load))
    elif direction == MAMBA2_HF_TO_ZOO:
        source = transformers.Mamba2ForCausalLM.from_pretrained(folder, **load)
        target = from_hf_mamba2(source)
    elif direction == MAMBA2_ZOO_TO_HF:
        target = to_hf_mamba2(Mamba2ForCausalLM.from_pretrained(folder, **load))
    elif direction == ZOO_TO_HF:
        target = to_hf_llama(LlamaForCausalLM.from_pretrained(folder, **load))
    else:  # MAMBA_ZOO_TO_HF
        target = to_hf_mamba(MambaForCausalLM.from_pretrained(folder, **load))
    dst.mkdir(parents=True, exist_ok=True)
    target.save_pretrained(dst)
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        AutoTokenizer.from_pretrained(folder).save_pretrained(dst)
    return direction
