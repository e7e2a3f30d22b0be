"""Convert fla's HGRN2 checkpoints (`fla.models.HGRN2ForCausalLM`: fla-hub/hgrn2-1.3B-100B,
fla-hub/hgrn2-2.7B-100B, ...) to zoo's HGRN2 family (`zoo.configuration.HGRN2Config`), exactly.

fla's HGRN2 is zoo's HGRN2 mixer with three differences, each a setting of zoo's mixer
(`zoo.layers.hgrn2`): fla's gla ops scale q by 1/sqrt(e) (`hgrn2_q_scale="rsqrt_dim"`), its
output norm `g_norm` is an RMSNorm with gain (`hgrn2_output_norm="rmsnorm"`; "srmsnorm" when
`elementwise_affine` is off) applied by `rms_norm_linear` with that function's default eps 1e-5,
not `g_norm.eps` (`hgrn2_output_norm_eps=1e-5`). Its blocks are RMSNorm with gain and a SwiGLU MLP
(transformers-style gate/up/down), zoo's `norm_type="rmsnorm"` and channel mixer "swiglu". The
lower bounds need no change: fla's β = cumsum(softmax(Γ, over layers)) − softmax(Γ)_0 is zoo's
`hgrn2_lower_bounds` formula, so `model.lower_bounds` is zoo's Γ as it is. fla skips the bound at
layer 0, whose β_0 is exactly 0 by that formula; zoo's layer 0 then computes the same log f. The
forget gate is the same, log f = logaddexp(log β, log(1 − β) + logsigmoid(x W_f)), k = 1 − f,
q = SiLU(x W_q), v = i = x W_i, and the state is e × e per head with H = d / e heads in both.

Config fields (fla `HGRN2Config` -> zoo `HGRN2Config`; fla's default where a field is absent)::

    vocab_size, hidden_size, num_hidden_layers,          same name
    tie_word_embeddings, initializer_range, use_cache,
    max_position_embeddings, bos/eos/pad_token_id
    norm_eps                                          -> rms_norm_eps (block and final norms)
    rms_norm_eps (older fla's name of norm_eps)       -> rms_norm_eps when norm_eps is absent
                                                         (fla 0.6.0 would ignore it and take
                                                         its default 1e-6); refused when both
                                                         are given and differ
    expand_ratio (None: hidden_size / num_heads)      -> hgrn2_expand_ratio, and
                                                         num_attention_heads = hidden_size / e
    intermediate_size (None: 2/3 · hidden_ratio · d,  -> intermediate_size
      rounded up to a multiple of 256, as fla's MLP)
    elementwise_affine True / False                   -> hgrn2_output_norm "rmsnorm" / "srmsnorm"
    (always)                                          -> hgrn2_q_scale="rsqrt_dim",
                                                         hgrn2_output_norm_eps=1e-5,
                                                         norm_type="rmsnorm",
                                                         channel_mixers=["swiglu"] * L
    hidden_act="swish", use_lower_bound=True,            required (refused otherwise)
    use_short_conv=False, attn=None,
    attnres_block_size=None
    attn_mode ("chunk", "fused_chunk",                   accepted: the same math (fla itself
      "fused_recurrent"), fuse_norm, fuse_swiglu,        runs "fused_recurrent" up to 64 tokens)
      fuse_cross_entropy, fuse_linear_cross_entropy
    conv_size, share_conv_kernel                          accepted: unused without short convs
    use_l2warp                                            accepted: it only adds a gradient
                                                          penalty in training (warned when True)
    model_type, architectures, transformers_version,      metadata, accepted
      torch_dtype, dtype, keys starting with "_"

State dict keys (layer i; `.weight`)::

    model.embeddings                  -> model.embed_tokens
    model.lower_bounds (L, d)         -> model.hgrn2_lower_bounds (unchanged: the same Γ)
    model.layers.i.attn_norm          -> model.layers.i.mixer_norm
    model.layers.i.attn.{q,f,i,o}_proj -> model.layers.i.mixer.{q,f,i,o}_proj
    model.layers.i.attn.g_norm        -> model.layers.i.mixer.norm  (absent without gain)
    model.layers.i.mlp_norm           -> model.layers.i.channel_norm
    model.layers.i.mlp.{gate,up,down}_proj -> model.layers.i.channel_mixer.{gate,up,down}_proj
    model.norm, lm_head               unchanged (lm_head may be absent when tied)

What cannot be converted is refused with a one-line `ValueError` naming the field and its value,
from config.json alone before any weight is read: short convolutions (`use_short_conv=True`), no
lower bounds (`use_lower_bound=False`: zoo's model always holds Γ and its β_l > 0 for l > 0),
hybrid softmax-attention layers (`attn`), attention residuals (`attnres_block_size`), an MLP
activation other than "swish" (`hidden_act`), an `expand_ratio` or `num_heads` that does not
divide `hidden_size` (fla's q/f projections would then be narrower than d), an unknown
`attn_mode`, and any field not named above. A state dict key outside the table is refused too.

fla's norms differ from zoo's only in rounding: in fp32 a converted model's logits match fla's to
float precision (tests/test_convert_fla_hgrn2.py measures it). Weights are read from
model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin (tensors only).
There is no zoo -> fla direction: fla's model is not a transformers class.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from zoo.configuration import HGRN2Config
from zoo.convert.common import (
    FLA_ACCEPTED,
    FLA_BASE_DEFAULTS,
    FLA_SAME_NAME,
    ForeignFormat,
    check_fla_config,
    fla_mlp_width,
    load_converted,
    load_weights,
    read_config,
    refuse,
    rename_fla_state_dict,
)
from zoo.modeling import HGRN2ForCausalLM

__all__ = ["FORMAT", "config_from_fla", "from_fla_hgrn2", "matches", "state_dict_from_fla"]

SOURCE = "fla hgrn2"
# fla/layers/hgrn2.py applies g_norm through `rms_norm_linear` without passing its eps: that
# function's default, whatever the config's norm_eps.
FLA_OUTPUT_NORM_EPS = 1e-5

# fla 0.6.0's HGRN2Config defaults, for fields a config.json leaves out.
_FLA_DEFAULTS: dict[str, Any] = {
    **FLA_BASE_DEFAULTS,
    "num_heads": None,
    "expand_ratio": 128,
    "use_lower_bound": True,
}

# Older fla configs name norm_eps "rms_norm_eps" (read when norm_eps is absent); share_conv_kernel
# exists only with short convolutions.
_KNOWN = frozenset({*_FLA_DEFAULTS, *FLA_ACCEPTED, "rms_norm_eps", "share_conv_kernel"})

_LAYER_KEYS: dict[str, str] = {
    "attn_norm.weight": "mixer_norm.weight",
    "attn.q_proj.weight": "mixer.q_proj.weight",
    "attn.f_proj.weight": "mixer.f_proj.weight",
    "attn.i_proj.weight": "mixer.i_proj.weight",
    "attn.o_proj.weight": "mixer.o_proj.weight",
    "attn.g_norm.weight": "mixer.norm.weight",
    "mlp_norm.weight": "channel_norm.weight",
    "mlp.gate_proj.weight": "channel_mixer.gate_proj.weight",
    "mlp.up_proj.weight": "channel_mixer.up_proj.weight",
    "mlp.down_proj.weight": "channel_mixer.down_proj.weight",
}
_SHARED_KEYS: dict[str, str] = {
    "model.embeddings.weight": "model.embed_tokens.weight",
    "model.lower_bounds": "model.hgrn2_lower_bounds",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_SHARD_INDEX = "model.safetensors.index.json"


def matches(fields: Mapping[str, Any]) -> bool:
    """Whether a config.json is fla's HGRN2 (model_type "hgrn2"; zoo's own is "zoo_hgrn2")."""
    return fields.get("model_type") == "hgrn2"


def _expand_ratio(fields: Mapping[str, Any], hidden_size: int) -> int:
    """e as fla's `HGRN2Attention` takes it: `expand_ratio`, else hidden_size / num_heads; it must
    divide hidden_size, or fla's q and f projections are narrower than d."""
    ratio = fields.get("expand_ratio", _FLA_DEFAULTS["expand_ratio"])
    if ratio is not None:
        if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio <= 0:
            raise refuse(SOURCE, "expand_ratio", ratio, "must be a positive integer")
        if hidden_size % ratio:
            raise refuse(
                SOURCE,
                "expand_ratio",
                ratio,
                f"does not divide hidden_size={hidden_size}; fla's forget dim would be "
                f"{hidden_size // ratio * ratio}, zoo's HGRN2 needs the full width",
            )
        return ratio
    heads = fields.get("num_heads")
    if heads is None:
        raise refuse(SOURCE, "expand_ratio", None, "one of expand_ratio and num_heads must be set")
    if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0 or hidden_size % heads:
        raise refuse(
            SOURCE, "num_heads", heads, f"must be a positive divisor of hidden_size={hidden_size}"
        )
    return hidden_size // heads


def config_from_fla(fields: Mapping[str, Any]) -> HGRN2Config:
    """zoo's `HGRN2Config` for an fla HGRN2 config.json (its fields as a dict); a one-line
    `ValueError` naming the field for anything zoo's HGRN2 cannot express."""
    if "model_type" in fields and not matches(fields):
        raise refuse(SOURCE, "model_type", fields["model_type"], "not fla's HGRN2 ('hgrn2')")

    def get(field: str) -> Any:
        return fields.get(field, _FLA_DEFAULTS[field])

    refusals = (
        (
            "use_lower_bound",
            not get("use_lower_bound"),
            "zoo's HGRN2 always learns lower bounds Γ, and its β_l > 0 for every layer l > 0",
        ),
    )
    hidden_size = check_fla_config(fields, SOURCE, _KNOWN, refusals, get)
    norm_eps = fields.get("norm_eps", fields.get("rms_norm_eps", _FLA_DEFAULTS["norm_eps"]))
    if "norm_eps" in fields and "rms_norm_eps" in fields and fields["rms_norm_eps"] != norm_eps:
        raise refuse(
            SOURCE,
            "rms_norm_eps",
            fields["rms_norm_eps"],
            f"older fla's name of norm_eps, which says {norm_eps}: which one holds is unclear",
        )
    ratio = _expand_ratio(fields, hidden_size)
    layers = get("num_hidden_layers")
    return HGRN2Config(
        **{field: get(field) for field in FLA_SAME_NAME},
        num_attention_heads=hidden_size // ratio,
        hgrn2_expand_ratio=ratio,
        intermediate_size=fla_mlp_width(hidden_size, get("hidden_ratio"), get("intermediate_size")),
        rms_norm_eps=norm_eps,
        norm_type="rmsnorm",
        channel_mixers=["swiglu"] * layers if isinstance(layers, int) else None,
        hgrn2_q_scale="rsqrt_dim",
        hgrn2_output_norm="rmsnorm" if get("elementwise_affine") else "srmsnorm",
        hgrn2_output_norm_eps=FLA_OUTPUT_NORM_EPS,
    )


def state_dict_from_fla(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fla's HGRN2 state dict under zoo's names (the table above; tensors unchanged). A key
    outside the table is a `ValueError` naming it."""
    return rename_fla_state_dict(state_dict, _SHARED_KEYS, _LAYER_KEYS, SOURCE)


def from_fla_hgrn2(src: str | Path) -> HGRN2ForCausalLM:
    """zoo's `HGRN2ForCausalLM` (eval mode, in the weights' dtype) from an fla HGRN2
    `save_pretrained` folder; config.json is checked before any weight is read."""
    src = Path(src)
    config = config_from_fla(read_config(src))
    state_dict = state_dict_from_fla(load_weights(src))
    return load_converted(
        HGRN2ForCausalLM, config, state_dict, src, embed_name="model.embeddings.weight"
    )


FORMAT = ForeignFormat("fla_hgrn2", "zoo_hgrn2", matches, config_from_fla, from_fla_hgrn2)
