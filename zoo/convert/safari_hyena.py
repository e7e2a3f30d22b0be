"""Convert safari's Hyena language models (HazyResearch/safari `ConvLMHeadModel` with Hyena
layers: the Hub's Zymrael/hyena-small-150b-tok, "Hyena-153M") into zoo's Hyena family.

safari's LM (src/models/sequence/long_conv_lm.py, hyena.py, at 02220c6) is zoo's backbone with
GPT-2's pieces: pre-LayerNorm blocks (LayerNorm with bias, eps `layer_norm_epsilon`), the
`HyenaOperator` as sequence mixer, a GELU MLP with biases as channel mixer (flash_attn's `Mlp`
with tanh-GELU, or its `FusedMLP`, the same function), a final LayerNorm and an LM head tied to
the embedding, over the vocabulary padded up to `pad_vocab_size_multiple`. The converted model
is zoo's `HyenaConfig` with `norm_type="layernorm"`, `channel_mixers=["gelu_mlp"] * n_layer`
and `hyena_learned_pos_emb=True`: safari trains the filters' positional features z (at
`lr_pos_emb`), so they are loaded, not recomputed.

The folder: config.json holds the keyword arguments of `ConvLMHeadModel` (safari's model config,
e.g. the `model_config` mapping of safari's configs/evals/hyena_small_150b.yaml written as JSON)
and the weights are `model.safetensors` or `pytorch_model.bin` (a plain state dict, as
`ConvLMHeadModel.state_dict()` gives and safari's evals/lambada.py loads; read as tensors only).
The released small model's config.json is::

    {"_name_": "lm", "d_model": 864, "d_inner": 1728, "n_layer": 18, "vocab_size": 50257,
     "embed_dropout": 0.0, "fused_mlp": true, "fused_dropout_add_ln": true,
     "residual_in_fp32": true, "pad_vocab_size_multiple": 8,
     "layer": {"_name_": "hyena", "emb_dim": 33, "filter_order": 64, "local_order": 3,
               "l_max": 2048, "modulate": false, "w": 14}}

`matches`: no `model_type`, `d_model` and `n_layer` present and `layer` a mapping with a
`_name_` (safari's LM schema; a layer other than "hyena" is then refused by name).

Config fields (safari `ConvLMHeadModel` / `HyenaOperator` / `HyenaFilter` -> zoo
`HyenaConfig`), safari's defaults where absent::

    d_model -> hidden_size             n_layer -> num_hidden_layers
    d_inner (None: 4·d_model)          -> intermediate_size
    vocab_size, padded up to a multiple of pad_vocab_size_multiple (1) -> vocab_size
    layer_norm_epsilon (1e-5)          -> rms_norm_eps (the eps of zoo's every norm)
    layer.l_max                        -> max_position_embeddings
    layer.order (2)                    -> hyena_order
    layer.filter_order (64)            -> hyena_filter_order
    layer.short_filter_order (3)       -> hyena_short_filter
    layer.emb_dim (3)                  -> hyena_emb_dim
    layer.num_inner_mlps (2)           -> hyena_num_inner_mlps
    layer.modulate (True)              -> hyena_modulate
    layer.shift (0.0)                  -> hyena_modulation_shift
    layer.target (1e-2)                -> hyena_decay_target
    layer.fast_decay_pct (0.3)         -> hyena_fast_decay_pct
    layer.slow_decay_pct (1.5)         -> hyena_slow_decay_pct
    layer.normalized (False)           -> hyena_normalized
    layer.bias (True)                  -> hyena_filter_bias
    (implied)                          -> norm_type "layernorm", channel_mixers "gelu_mlp"
                                          (gelu_mlp_approximate "tanh"), hyena_learned_pos_emb,
                                          tie_word_embeddings, num_attention_heads 1 (unused)
    bos_token_id, eos_token_id, pad_token_id: not safari's; read when present (the GPT-2
        tokenizer of the released model: 50256), else None

Accepted without effect on a converted model's outputs: the training-only `embed_dropout`,
`resid_dropout` and `layer.dropout` (zoo's blocks have none; a warning when nonzero),
`layer.filter_dropout` (safari never applies it), the init- and optimizer-only
`initializer_cfg`, `layer.w` (ω's init; the checkpoint holds ω), `layer.lr`, `layer.lr_pos_emb`
and `layer.wd`, the implementation switches `fused_mlp`, `fused_dropout_add_ln`,
`residual_in_fp32` (zoo's residual stream is in the weights' dtype: the same in fp32, rounding
apart in bf16), `sequence_parallel`, `process_group` (null), `device`, `dtype` (the weights'
dtype is used), `layer.fused_bias_fc`, `layer.fused_fft_conv`, `layer.jit_filter`,
`layer.return_state`, `layer.modulation_lr` when `modulate` is off, and `layer.local_order`
(safari's `ExponentialModulation` swallows it: the short conv's width is `short_filter_order`).

Refused from config.json alone, one line naming the field: another `_name_` or layer
(`layer._name_` "h3", ...), attention layers (`attn_layer_idx`), GPT-2 absolute position
embeddings (`max_position_embeddings` > 0), `layer.num_heads`, `layer.inner_factor` or
`layer.num_blocks` other than 1, `layer.outer_mixing`, `layer.post_order_ffn`, an
`layer.activation` other than identity, a `layer.filter_cls` other than "hyena-filter", a trained
decay (`layer.modulation_lr` > 0 with `modulate`), and any field not named here.

State dict keys (layer i; `.weight` and `.bias` where the module has them)::

    backbone.embeddings.word_embeddings         -> model.embed_tokens
    backbone.layers.i.norm1 / norm2             -> model.layers.i.mixer_norm / channel_norm
    backbone.layers.i.mixer.in_proj / out_proj  -> model.layers.i.mixer.in_proj / out_proj
    backbone.layers.i.mixer.short_filter        -> model.layers.i.mixer.short_filter
    ...mixer.filter_fn.implicit_filter.{2k}     -> ...mixer.filter_fn.ffn.{k}   (the Linears)
    ...mixer.filter_fn.implicit_filter.{2k+1}.freq (1, F), one shared Sin
                                                -> ...mixer.filter_fn.freq (F,) (all equal)
    ...mixer.filter_fn.bias                     -> ...mixer.filter_fn.bias (dropped when
                                                   layer.bias is false: safari multiplies it
                                                   by 0)
    ...mixer.filter_fn.pos_emb.z (1, L_max, E)  -> ...mixer.filter_fn.pos_emb (L_max, E)
    ...mixer.filter_fn.pos_emb.t, ...mixer.filter_fn.modulation.deltas
                                                -> dropped: zoo recomputes them; with `modulate`
                                                   they must equal zoo's to 1e-6 (safari keeps
                                                   them fixed), else refused naming the key
    backbone.layers.i.mlp.fc1 / fc2             -> model.layers.i.channel_mixer.fc1 / fc2
    backbone.ln_f                               -> model.norm
    lm_head (optional; must equal the embedding) -> lm_head (tied)

Any other key is refused naming it. The conversion is exact in fp32 up to rounding: the filters
come out bit for bit equal, and zoo convolves with its own FFT/direct kernels, so fp32 logits
agree to within 1e-5 (5.4e-6 measured on logits of magnitude 7, tests/test_convert_safari_hyena.py)
and greedy decoding (zoo's cached steps) gives the same tokens. Not carried: safari truncates
inputs longer than l_max silently, zoo refuses them; in bf16 safari keeps the residual stream in
fp32 (`residual_in_fp32`) and zoo in bf16.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from zoo.configuration import HyenaConfig
from zoo.convert.common import (
    EMBED,
    HEAD,
    ForeignFormat,
    load_converted,
    load_weights,
    read_config,
    refuse,
)
from zoo.layers.hyena import decay_rates
from zoo.modeling import HyenaForCausalLM

__all__ = ["FORMAT", "config_from_safari", "from_safari_hyena", "matches", "state_dict_from_safari"]

logger = logging.getLogger(__name__)

SOURCE = "safari hyena"
# ConvLMHeadModel's keyword arguments this converter reads or accepts (see the module docstring).
_MODEL_FIELDS = {
    "_name_", "d_model", "n_layer", "d_inner", "vocab_size", "layer", "pad_vocab_size_multiple",
    "layer_norm_epsilon", "max_position_embeddings", "attn_layer_idx", "attn_cfg",
    "process_group", "resid_dropout", "embed_dropout", "initializer_cfg", "fused_mlp",
    "fused_dropout_add_ln", "residual_in_fp32", "sequence_parallel", "device", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id",
}  # fmt: skip
# HyenaOperator's, HyenaFilter's and ExponentialModulation's keyword arguments, with safari's
# defaults for those that shape the network.
_LAYER_DEFAULTS: dict[str, Any] = {
    "order": 2,
    "filter_order": 64,
    "short_filter_order": 3,
    "emb_dim": 3,
    "num_inner_mlps": 2,
    "modulate": True,
    "shift": 0.0,
    "target": 1e-2,
    "fast_decay_pct": 0.3,
    "slow_decay_pct": 1.5,
    "normalized": False,
    "bias": True,
}
_LAYER_ACCEPTED = {
    "_name_", "l_max", "dropout", "filter_dropout", "w", "lr", "lr_pos_emb", "wd",
    "modulation_lr", "fused_bias_fc", "fused_fft_conv", "jit_filter", "return_state",
    "local_order", "num_heads", "inner_factor", "num_blocks", "outer_mixing", "post_order_ffn",
    "activation", "filter_cls",
}  # fmt: skip
# Layer fields zoo's Hyena has only at one value: (field, allowed values, why).
_LAYER_FIXED = (
    ("num_heads", (1,), "zoo's Hyena operator has one head"),
    ("inner_factor", (1,), "zoo's Hyena operator mixes at the model width"),
    ("num_blocks", (1,), "zoo's long convolutions span the whole sequence"),
    ("outer_mixing", (False,), "zoo's Hyena gates elementwise"),
    ("post_order_ffn", (False,), "zoo's Hyena has no dense layer between its orders"),
    ("activation", (None, "id", "identity", "linear"), "zoo's Hyena has no output activation"),
    ("filter_cls", ("hyena-filter",), "zoo's Hyena has safari's implicit 'hyena-filter' only"),
)
_DROPOUTS = ("embed_dropout", "resid_dropout", "layer.dropout")


def matches(fields: Mapping[str, Any]) -> bool:
    """Whether a config.json is safari's LM schema: `ConvLMHeadModel`'s keyword arguments (no
    `model_type`, `d_model`, `n_layer`, and a `layer` mapping naming its mixer by `_name_`)."""
    layer = fields.get("layer")
    return (
        "model_type" not in fields
        and "d_model" in fields
        and "n_layer" in fields
        and isinstance(layer, Mapping)
        and "_name_" in layer
    )


def _positive_int(field: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise refuse(SOURCE, field, value, "expected a positive integer")
    return value


def config_from_safari(fields: Mapping[str, Any]) -> HyenaConfig:
    """zoo's `HyenaConfig` for a safari `ConvLMHeadModel` config.json; a one-line `ValueError`
    naming the field for what zoo's Hyena cannot express."""
    for field in fields:
        if field not in _MODEL_FIELDS:
            raise refuse(SOURCE, field, fields[field], "not a field this converter knows")
    if fields.get("_name_", "lm") != "lm":
        raise refuse(SOURCE, "_name_", fields["_name_"], "expected safari's LM, 'lm'")
    layer = fields.get("layer")
    if not isinstance(layer, Mapping) or layer.get("_name_") != "hyena":
        value = layer.get("_name_") if isinstance(layer, Mapping) else layer
        raise refuse(SOURCE, "layer._name_", value, "zoo converts safari's Hyena layers only")
    for field in layer:
        if field not in _LAYER_ACCEPTED and field not in _LAYER_DEFAULTS:
            raise refuse(SOURCE, f"layer.{field}", layer[field], "not a field this converter knows")
    for field, allowed, why in _LAYER_FIXED:
        if field in layer and layer[field] not in allowed:
            raise refuse(SOURCE, f"layer.{field}", layer[field], why)
    if fields.get("attn_layer_idx"):
        raise refuse(
            SOURCE, "attn_layer_idx", fields["attn_layer_idx"],
            "flash_attn attention layers have no zoo counterpart in this converter",
        )  # fmt: skip
    if fields.get("max_position_embeddings"):
        raise refuse(
            SOURCE, "max_position_embeddings", fields["max_position_embeddings"],
            "zoo's Hyena has no learned absolute position embeddings",
        )  # fmt: skip
    if fields.get("process_group") is not None:
        raise refuse(SOURCE, "process_group", fields["process_group"], "expected null")
    settings = {**_LAYER_DEFAULTS, **{k: v for k, v in layer.items() if k in _LAYER_DEFAULTS}}
    if settings["modulate"] and layer.get("modulation_lr", 0.0):
        raise refuse(
            SOURCE, "layer.modulation_lr", layer["modulation_lr"],
            "safari then trains the decay rates δ; zoo's are fixed",
        )  # fmt: skip
    for name in _DROPOUTS:
        value = layer.get("dropout") if name == "layer.dropout" else fields.get(name)
        if value:
            logger.warning("%s=%s dropped: zoo's Hyena blocks have no dropout", name, value)

    d_model = _positive_int("d_model", fields.get("d_model"))
    n_layer = _positive_int("n_layer", fields.get("n_layer"))
    vocab = _positive_int("vocab_size", fields.get("vocab_size"))
    multiple = _positive_int("pad_vocab_size_multiple", fields.get("pad_vocab_size_multiple", 1))
    d_inner = fields.get("d_inner")
    d_inner = 4 * d_model if d_inner is None else _positive_int("d_inner", d_inner)
    l_max = _positive_int("layer.l_max", layer.get("l_max"))
    try:
        return HyenaConfig(
            vocab_size=-(-vocab // multiple) * multiple,
            hidden_size=d_model,
            num_hidden_layers=n_layer,
            intermediate_size=d_inner,
            num_attention_heads=1,
            channel_mixers=["gelu_mlp"] * n_layer,
            gelu_mlp_approximate="tanh",
            norm_type="layernorm",
            rms_norm_eps=float(fields.get("layer_norm_epsilon", 1e-5)),
            max_position_embeddings=l_max,
            hyena_order=settings["order"],
            hyena_filter_order=settings["filter_order"],
            hyena_short_filter=settings["short_filter_order"],
            hyena_emb_dim=settings["emb_dim"],
            hyena_num_inner_mlps=settings["num_inner_mlps"],
            hyena_modulate=settings["modulate"],
            hyena_modulation_shift=settings["shift"],
            hyena_decay_target=settings["target"],
            hyena_fast_decay_pct=settings["fast_decay_pct"],
            hyena_slow_decay_pct=settings["slow_decay_pct"],
            hyena_normalized=settings["normalized"],
            hyena_filter_bias=settings["bias"],
            hyena_learned_pos_emb=True,
            tie_word_embeddings=True,
            bos_token_id=fields.get("bos_token_id"),
            eos_token_id=fields.get("eos_token_id"),
            pad_token_id=fields.get("pad_token_id"),
        )
    except ValueError as error:  # a value zoo's own checks refuse (an even emb_dim, ...)
        raise ValueError(f"{SOURCE} config.json gives no valid zoo HyenaConfig: {error}") from error


_BLOCK_RE = re.compile(r"^backbone\.layers\.(\d+)\.(norm1|norm2|mlp|mixer)\.(.+)$")
_FILTER_RE = re.compile(r"^filter_fn\.implicit_filter\.(\d+)\.(weight|bias|freq)$")
_TOP = {
    "backbone.embeddings.word_embeddings.weight": EMBED,
    "backbone.ln_f.weight": "model.norm.weight",
    "backbone.ln_f.bias": "model.norm.bias",
    "lm_head.weight": HEAD,
}
_MIXER = re.compile(r"^(in_proj|out_proj|short_filter)\.(weight|bias)$")
_MLP = re.compile(r"^(fc1|fc2)\.(weight|bias)$")
# How far safari's stored t and δ may be from zoo's recomputed ones (the same linspace; another
# torch build may round its last bit differently).
_FIXED_TOLERANCE = 1e-6


def _check_fixed(key: str, stored: torch.Tensor, recomputed: torch.Tensor) -> None:
    stored = stored.float().reshape(recomputed.shape)
    error = (stored - recomputed).abs().max().item()
    if error > _FIXED_TOLERANCE * max(1.0, recomputed.abs().max().item()):
        raise ValueError(
            f"safari hyena weight {key!r} differs from the fixed values zoo recomputes (max "
            f"|difference| {error:.3g}): zoo's t and decay rates δ are not parameters"
        )


def state_dict_from_safari(
    state_dict: Mapping[str, torch.Tensor], config: HyenaConfig
) -> dict[str, torch.Tensor]:
    """safari `ConvLMHeadModel` keys -> zoo Hyena keys, for the model `config` describes (which
    says whether the filter bias is kept and t and δ are checked)."""
    out: dict[str, torch.Tensor] = {}
    freqs: dict[str, tuple[str, torch.Tensor]] = {}
    channels = config.hidden_size * (config.hyena_order - 1)
    for key, tensor in state_dict.items():
        if key in _TOP:
            out[_TOP[key]] = tensor
            continue
        match = _BLOCK_RE.match(key)
        if match is None:
            raise ValueError(f"safari hyena weight {key!r} has no place in zoo's Hyena")
        i, part, rest = match.groups()
        prefix = f"model.layers.{i}"
        if part in ("norm1", "norm2") and rest in ("weight", "bias"):
            out[f"{prefix}.{'mixer' if part == 'norm1' else 'channel'}_norm.{rest}"] = tensor
        elif part == "mlp" and _MLP.match(rest):
            out[f"{prefix}.channel_mixer.{rest}"] = tensor
        elif part == "mixer" and _MIXER.match(rest):
            out[f"{prefix}.mixer.{rest}"] = tensor
        elif part == "mixer" and (found := _FILTER_RE.match(rest)):
            index, name = int(found.group(1)), found.group(2)
            if name == "freq" and index % 2 == 1:  # one Sin module, shared by every position
                first = freqs.setdefault(i, (key, tensor))
                if not torch.equal(first[1], tensor):
                    raise ValueError(
                        f"safari hyena weight {key!r} differs from {first[0]!r}: zoo's filter "
                        "shares one Sin frequency ω across its layers, as safari builds it"
                    )
                out[f"{prefix}.mixer.filter_fn.freq"] = tensor.reshape(-1)
            elif name != "freq" and index % 2 == 0:
                out[f"{prefix}.mixer.filter_fn.ffn.{index // 2}.{name}"] = tensor
            else:
                raise ValueError(f"safari hyena weight {key!r} has no place in zoo's Hyena")
        elif part == "mixer" and rest == "filter_fn.bias":
            if config.hyena_filter_bias:
                out[f"{prefix}.mixer.filter_fn.bias"] = tensor
        elif part == "mixer" and rest == "filter_fn.pos_emb.z":
            out[f"{prefix}.mixer.filter_fn.pos_emb"] = tensor.reshape(tensor.shape[-2:])
        elif part == "mixer" and rest == "filter_fn.pos_emb.t":
            if config.hyena_modulate:
                _check_fixed(key, tensor, torch.linspace(0, 1, config.max_position_embeddings))
        elif part == "mixer" and rest == "filter_fn.modulation.deltas":
            if config.hyena_modulate:
                decay = (
                    config.hyena_decay_target,
                    config.hyena_fast_decay_pct,
                    config.hyena_slow_decay_pct,
                )
                _check_fixed(key, tensor.abs(), decay_rates(channels, *decay))
        else:
            raise ValueError(f"safari hyena weight {key!r} has no place in zoo's Hyena")
    return out


def from_safari_hyena(src: str | Path) -> HyenaForCausalLM:
    """zoo's `HyenaForCausalLM` from a safari Hyena LM folder (config.json with
    `ConvLMHeadModel`'s arguments, model.safetensors or pytorch_model.bin). The config is checked
    before any weight is read."""
    config = config_from_safari(read_config(src))
    state_dict = state_dict_from_safari(load_weights(src), config)
    return load_converted(
        HyenaForCausalLM, config, state_dict, src,
        embed_name="backbone.embeddings.word_embeddings.weight",
    )  # fmt: skip


FORMAT = ForeignFormat("safari_hyena", "zoo_hyena", matches, config_from_safari, from_safari_hyena)
