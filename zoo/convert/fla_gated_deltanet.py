"""Convert fla's Gated DeltaNet checkpoints (`fla.models.GatedDeltaNetForCausalLM`:
fla-hub/gated_deltanet-1.3B-100B, ...) to zoo's Gated DeltaNet family
(`zoo.configuration.GatedDeltaNetConfig`), exactly.

zoo's mixer (`zoo.layers.gated_deltanet`) is fla's `GatedDeltaNet` layer under fla's parameter
names; fla's blocks are RMSNorm with gain and a SwiGLU `GatedMLP`, zoo's `norm_type="rmsnorm"`
and "swiglu". So the conversion is a renaming of the blocks' keys.

Config fields (fla `GatedDeltaNetConfig` -> zoo `GatedDeltaNetConfig`; fla's default where a
field is absent)::

    vocab_size, hidden_size, num_hidden_layers,          same name
    tie_word_embeddings, initializer_range, use_cache,
    max_position_embeddings, bos/eos/pad_token_id
    num_heads, num_v_heads (None: num_heads)          -> gdn_num_heads, gdn_num_v_heads
    head_dim, expand_v, conv_size                     -> gdn_head_dim, gdn_expand_v, gdn_conv_size
    norm_eps                                          -> rms_norm_eps (blocks, final norm and
                                                         the layer's per-head norm, as fla)
    intermediate_size (None: 2/3 · hidden_ratio · d,  -> intermediate_size
      rounded up to a multiple of 256)
    attn_mode ("chunk", "fused_recurrent", ...),      accepted: the same math
      fuse_* flags, model_type, architectures, dtype
    use_l2warp                                        accepted (warned when True)

State dict keys (layer i)::

    model.embeddings.weight                  -> model.embed_tokens.weight
    model.layers.i.attn_norm.weight          -> model.layers.i.mixer_norm.weight
    model.layers.i.attn.X                    -> model.layers.i.mixer.X  (q/k/v/a/b/g/o_proj,
                                                A_log, dt_bias, q/k/v_conv1d, o_norm)
    model.layers.i.mlp_norm.weight           -> model.layers.i.channel_norm.weight
    model.layers.i.mlp.{gate,up,down}_proj   -> model.layers.i.channel_mixer.{...}
    model.norm.weight, lm_head.weight        unchanged (lm_head may be absent when tied)

Refused from config.json alone, before any weight is read, with a one-line `ValueError` naming
the field: no short convolutions (`use_short_conv=False`), no output gate (`use_gate=False`),
negative eigenvalues (`allow_neg_eigval`), a sigmoid output gate (`output_gate_activation`),
an activation other than "swish", hybrid attention layers (`attn`), attention residuals, and any
unknown field. There is no zoo -> fla direction: fla's model is not a transformers class.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from zoo.configuration import GatedDeltaNetConfig
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
from zoo.modeling import GatedDeltaNetForCausalLM

__all__ = ["FORMAT", "config_from_fla", "from_fla_gated_deltanet", "matches", "state_dict_from_fla"]

SOURCE = "fla gated_deltanet"

# fla 0.6's GatedDeltaNetConfig defaults, for fields a config.json leaves out.
_FLA_DEFAULTS: dict[str, Any] = {
    **FLA_BASE_DEFAULTS,
    "num_hidden_layers": 21,
    "use_short_conv": True,
    "expand_v": 2.0,
    "use_gate": True,
    "allow_neg_eigval": False,
    "head_dim": 256,
    "num_heads": 6,
    "num_v_heads": None,
    "output_gate_activation": "swish",
}

_KNOWN = frozenset({*_FLA_DEFAULTS, *FLA_ACCEPTED})
_MIXER_WEIGHTS = (
    "q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj", "q_conv1d", "k_conv1d",
    "v_conv1d", "o_norm",
)  # fmt: skip
_LAYER_KEYS: dict[str, str] = {
    "attn_norm.weight": "mixer_norm.weight",
    **{f"attn.{name}.weight": f"mixer.{name}.weight" for name in _MIXER_WEIGHTS},
    "attn.A_log": "mixer.A_log",
    "attn.dt_bias": "mixer.dt_bias",
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
    """Whether a config.json is fla's Gated DeltaNet (model_type "gated_deltanet")."""
    return fields.get("model_type") == "gated_deltanet"


def config_from_fla(fields: Mapping[str, Any]) -> GatedDeltaNetConfig:
    """zoo's `GatedDeltaNetConfig` for an fla Gated DeltaNet config.json (its fields as a dict);
    a one-line `ValueError` naming the field for anything zoo's layer cannot express."""
    if "model_type" in fields and not matches(fields):
        raise refuse(SOURCE, "model_type", fields["model_type"], "not fla's Gated DeltaNet")

    def get(field: str) -> Any:
        return fields.get(field, _FLA_DEFAULTS[field])

    refusals = (
        ("use_short_conv", not get("use_short_conv"), "zoo's layer always has the short convs"),
        ("use_gate", not get("use_gate"), "zoo's layer always gates its output"),
        ("allow_neg_eigval", bool(get("allow_neg_eigval")), "zoo's β is in (0, 1)"),
        (
            "output_gate_activation",
            get("output_gate_activation") not in ("swish", "silu"),
            "zoo's output gate is SiLU",
        ),
    )
    hidden_size = check_fla_config(fields, SOURCE, _KNOWN, refusals, get, short_convs=True)
    heads = get("num_heads")
    return GatedDeltaNetConfig(
        **{field: get(field) for field in FLA_SAME_NAME},
        num_attention_heads=heads,
        gdn_num_heads=heads,
        gdn_num_v_heads=get("num_v_heads") or heads,
        gdn_head_dim=get("head_dim"),
        gdn_expand_v=float(get("expand_v")),
        gdn_conv_size=get("conv_size"),
        intermediate_size=fla_mlp_width(hidden_size, get("hidden_ratio"), get("intermediate_size")),
        rms_norm_eps=get("norm_eps"),
        norm_type="rmsnorm",
    )


def state_dict_from_fla(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fla's Gated DeltaNet state dict under zoo's names (the table above; tensors unchanged). A
    key outside the table is a `ValueError` naming it."""
    return rename_fla_state_dict(state_dict, _SHARED_KEYS, _LAYER_KEYS, SOURCE)


def from_fla_gated_deltanet(src: str | Path) -> GatedDeltaNetForCausalLM:
    """zoo's `GatedDeltaNetForCausalLM` (eval mode, in the weights' dtype) from an fla Gated
    DeltaNet `save_pretrained` folder; config.json is checked before any weight is read."""
    src = Path(src)
    config = config_from_fla(read_config(src))
    state_dict = state_dict_from_fla(load_weights(src))
    return load_converted(
        GatedDeltaNetForCausalLM, config, state_dict, src, embed_name="model.embeddings.weight"
    )


FORMAT = ForeignFormat(
    "fla_gated_deltanet", "zoo_gated_deltanet", matches, config_from_fla, from_fla_gated_deltanet
)
