"""Convert fla's GLA checkpoints (`fla.models.GLAForCausalLM`: fla-hub/gla-1.3B-100B, ...) to zoo's
GLA family (`zoo.configuration.GLAConfig`), exactly.

zoo's GLA mixer (`zoo.layers.gla`) is fla's `GatedLinearAttention` with fla's defaults, under
fla's parameter names; fla's blocks are RMSNorm with gain and a SwiGLU `GatedMLP`, zoo's
`norm_type="rmsnorm"` and "swiglu". So the conversion is a renaming of the blocks' keys.

Config fields (fla `GLAConfig` -> zoo `GLAConfig`; fla's default where a field is absent)::

    vocab_size, hidden_size, num_hidden_layers,          same name
    tie_word_embeddings, initializer_range, use_cache,
    max_position_embeddings, bos/eos/pad_token_id
    num_heads                                         -> num_attention_heads
    expand_k, expand_v                                -> gla_expand_k, gla_expand_v
    norm_eps                                          -> rms_norm_eps (blocks, final norm and
                                                         the layer's per-head norm, as fla)
    intermediate_size (None: 2/3 · hidden_ratio · d,  -> intermediate_size
      rounded up to a multiple of 256)
    attn_mode ("chunk", "fused_chunk",                accepted: the same math
      "fused_recurrent"), fuse_norm, fuse_swiglu,
      fuse_cross_entropy, fuse_linear_cross_entropy,
      conv_size, model_type, architectures,
      transformers_version, torch_dtype, dtype
    use_l2warp                                        accepted: a training-time gradient
                                                      penalty only (warned when True)

State dict keys (layer i)::

    model.embeddings.weight                  -> model.embed_tokens.weight
    model.layers.i.attn_norm.weight          -> model.layers.i.mixer_norm.weight
    model.layers.i.attn.X                    -> model.layers.i.mixer.X  (q/k/v/g/o_proj,
                                                gk_proj.0/1, g_norm_swish_gate)
    model.layers.i.attn.g_norm.weight        -> model.layers.i.mixer.g_norm_swish_gate.weight
                                                (fuse_norm=False names the same gain so)
    model.layers.i.mlp_norm.weight           -> model.layers.i.channel_norm.weight
    model.layers.i.mlp.{gate,up,down}_proj   -> model.layers.i.channel_mixer.{...}
    model.norm.weight, lm_head.weight        unchanged (lm_head may be absent when tied)

Refused from config.json alone, before any weight is read, with a one-line `ValueError` naming
the field: grouped K/V heads (`num_kv_heads` ≠ `num_heads`), a feature map, short convolutions,
no output gate, a clamped gate (`clamp_min`), no key gate (`use_gk=False`) or a value gate
(`use_gv=True`), a per-head norm without gain (`elementwise_affine=False`), an activation other
than "swish", hybrid attention layers (`attn`), attention residuals, and any unknown field.
There is no zoo -> fla direction: fla's model is not a transformers class.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from zoo.configuration import GLAConfig
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
from zoo.modeling import GLAForCausalLM

__all__ = ["FORMAT", "config_from_fla", "from_fla_gla", "matches", "state_dict_from_fla"]

SOURCE = "fla gla"

# fla 0.6's GLAConfig defaults, for fields a config.json leaves out.
_FLA_DEFAULTS: dict[str, Any] = {
    **FLA_BASE_DEFAULTS,
    "expand_k": 0.5,
    "expand_v": 1.0,
    "num_heads": 4,
    "num_kv_heads": None,
    "feature_map": None,
    "use_output_gate": True,
    "clamp_min": None,
    "use_gk": True,
    "use_gv": False,
}

_KNOWN = frozenset({*_FLA_DEFAULTS, *FLA_ACCEPTED})
_MIXER_WEIGHTS = ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj")
_LAYER_KEYS: dict[str, str] = {
    "attn_norm.weight": "mixer_norm.weight",
    **{f"attn.{name}.weight": f"mixer.{name}.weight" for name in _MIXER_WEIGHTS},
    "attn.gk_proj.0.weight": "mixer.gk_proj.0.weight",
    "attn.gk_proj.1.weight": "mixer.gk_proj.1.weight",
    "attn.gk_proj.1.bias": "mixer.gk_proj.1.bias",
    "attn.g_norm_swish_gate.weight": "mixer.g_norm_swish_gate.weight",
    "attn.g_norm.weight": "mixer.g_norm_swish_gate.weight",
    "mlp_norm.weight": "channel_norm.weight",
    **{
        f"mlp.{n}.weight": f"channel_mixer.{n}.weight"
        for n in ("gate_proj", "up_proj", "down_proj")
    },
}
_SHARED_KEYS: dict[str, str] = {
    "model.embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def matches(fields: Mapping[str, Any]) -> bool:
    """Whether a config.json is fla's GLA (model_type "gla"; zoo's own is "zoo_gla")."""
    return fields.get("model_type") == "gla"


def config_from_fla(fields: Mapping[str, Any]) -> GLAConfig:
    """zoo's `GLAConfig` for an fla GLA config.json (its fields as a dict); a one-line
    `ValueError` naming the field for anything zoo's GLA cannot express."""
    if "model_type" in fields and not matches(fields):
        raise refuse(SOURCE, "model_type", fields["model_type"], "not fla's GLA ('gla')")

    def get(field: str) -> Any:
        return fields.get(field, _FLA_DEFAULTS[field])

    heads = get("num_heads")
    refusals = (
        ("num_kv_heads", get("num_kv_heads") not in (None, heads), "zoo's GLA has no K/V groups"),
        ("feature_map", get("feature_map") is not None, "zoo's GLA applies no feature map"),
        ("use_output_gate", not get("use_output_gate"), "zoo's GLA always gates its output"),
        ("clamp_min", get("clamp_min") is not None, "zoo's GLA does not clamp the gate"),
        ("use_gk", not get("use_gk"), "zoo's GLA always has the per-key forget gate"),
        ("use_gv", bool(get("use_gv")), "zoo's GLA has no value gate"),
        ("elementwise_affine", not get("elementwise_affine"), "zoo's per-head norm has a gain"),
    )
    hidden_size = check_fla_config(fields, SOURCE, _KNOWN, refusals, get)
    return GLAConfig(
        **{field: get(field) for field in FLA_SAME_NAME},
        num_attention_heads=heads,
        gla_expand_k=get("expand_k"),
        gla_expand_v=get("expand_v"),
        intermediate_size=fla_mlp_width(hidden_size, get("hidden_ratio"), get("intermediate_size")),
        rms_norm_eps=get("norm_eps"),
        norm_type="rmsnorm",
    )


def state_dict_from_fla(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fla's GLA state dict under zoo's names (the table above; tensors unchanged). A key
    outside the table is a `ValueError` naming it."""
    return rename_fla_state_dict(state_dict, _SHARED_KEYS, _LAYER_KEYS, SOURCE)


def from_fla_gla(src: str | Path) -> GLAForCausalLM:
    """zoo's `GLAForCausalLM` (eval mode, in the weights' dtype) from an fla GLA
    `save_pretrained` folder; config.json is checked before any weight is read."""
    src = Path(src)
    config = config_from_fla(read_config(src))
    state_dict = state_dict_from_fla(load_weights(src))
    return load_converted(
        GLAForCausalLM, config, state_dict, src, embed_name="model.embeddings.weight"
    )


FORMAT = ForeignFormat("fla_gla", "zoo_gla", matches, config_from_fla, from_fla_gla)
