"""zoo.convert on safari's Hyena LMs (HazyResearch/safari `ConvLMHeadModel`, the format of the
Hub's Zymrael/hyena-small-150b-tok): tiny random checkpoints in safari's layout convert to zoo
models whose logits and greedy continuations equal an independent forward written from safari's
code; what zoo cannot express is refused from config.json before any weight is read.

`safari_logits` below follows safari at commit 02220c69d247e5473616cd053a443ad99fd2559b:
src/models/sequence/long_conv_lm.py (`LMBackbone`, `create_block`, `create_mlp_cls`: GPT-2
embeddings, flash_attn's prenorm `Block` with LayerNorm, tanh-GELU `Mlp`, `ln_f`, tied head),
src/models/sequence/hyena.py (`HyenaOperator.forward`, `HyenaFilter.filter`,
`PositionalEmbedding`, `ExponentialModulation`, `Sin`, `fftconv_ref`) and flash_attn's
modules/block.py (`Block.forward` with prenorm: dropout, add, norm). It reads safari's key names
only and uses the stored z, t and δ, as safari's forward does.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import zoo
from zoo.convert import convert_checkpoint, foreign_formats
from zoo.convert.safari_hyena import FORMAT, config_from_safari, from_safari_hyena, matches

ATOL = 1e-5
DIRECTION = "safari_hyena->zoo_hyena"
# The released small model's layout (configs/evals/hyena_small_150b.yaml) at a tiny size: order
# 2, no decay window, safari's `local_order` (ignored by safari), fused switches on.
RELEASED_LIKE = {
    "_name_": "lm",
    "d_model": 24,
    "d_inner": 40,
    "n_layer": 2,
    "vocab_size": 50,
    "embed_dropout": 0.0,
    "fused_mlp": True,
    "fused_dropout_add_ln": True,
    "residual_in_fp32": True,
    "pad_vocab_size_multiple": 8,
    "layer": {
        "_name_": "hyena",
        "emb_dim": 5,
        "filter_order": 16,
        "local_order": 3,
        "l_max": 64,
        "modulate": False,
        "w": 14,
    },
}
# Every other option zoo can express: order 3, the decay window with a shift and its own rates,
# normalised filters, no filter bias, one inner Sin layer, a 4-tap short conv, safari's
# emb_dim default (3) and d_inner default (4·d), no vocabulary padding.
EVERY_OPTION = {
    "d_model": 16,
    "n_layer": 2,
    "vocab_size": 41,
    "layer_norm_epsilon": 1e-6,
    "layer": {
        "_name_": "hyena",
        "l_max": 48,
        "order": 3,
        "filter_order": 8,
        "short_filter_order": 4,
        "num_inner_mlps": 1,
        "modulate": True,
        "shift": 0.25,
        "target": 0.05,
        "fast_decay_pct": 0.5,
        "slow_decay_pct": 2.0,
        "normalized": True,
        "bias": False,
    },
}


# ------------------------------------------------------------------------ safari's forward


def _layer(fields: dict) -> dict:
    defaults = {"order": 2, "filter_order": 64, "short_filter_order": 3, "emb_dim": 3}
    defaults |= {"num_inner_mlps": 2, "modulate": True, "shift": 0.0, "normalized": False}
    return defaults | {"bias": True} | fields["layer"]


def fftconv_ref(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """safari's `fftconv_ref` without gelu and dropout: u (B, d, L), k (d, L), D (d,)."""
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    return (y + u * D.unsqueeze(-1)).to(dtype=u.dtype)


def implicit_filter(sd: dict, p: str, length: int, layer: dict) -> torch.Tensor:
    """`HyenaFilter.filter(L)`: (1, L, d·(order−1))."""
    z, t = sd[p + "pos_emb.z"][:, :length], sd[p + "pos_emb.t"][:, :length]
    h = z
    for index in range(2 * layer["num_inner_mlps"] + 3):  # Linear, Sin, ..., Linear
        if index % 2 == 0:
            h = F.linear(h, sd[f"{p}implicit_filter.{index}.weight"],
                         sd.get(f"{p}implicit_filter.{index}.bias"))  # fmt: skip
        else:
            h = torch.sin(sd[f"{p}implicit_filter.{index}.freq"] * h)
    if layer["modulate"]:
        decay = torch.exp(-t * sd[p + "modulation.deltas"].abs())
        h = h * (decay + layer["shift"])
    if layer["normalized"]:
        h = h / torch.norm(h, dim=-1, p=1, keepdim=True)
    return h


def hyena_operator(sd: dict, p: str, u: torch.Tensor, fields: dict) -> torch.Tensor:
    """`HyenaOperator.forward` for one head, one block, no outer mixing, identity activation."""
    layer = _layer(fields)
    d, order = fields["d_model"], layer["order"]
    length = u.shape[-2]
    l_filter = min(length, layer["l_max"])
    u = F.linear(u, sd[p + "in_proj.weight"], sd[p + "in_proj.bias"]).transpose(1, 2)
    weight = sd[p + "short_filter.weight"]
    uc = F.conv1d(u, weight, sd[p + "short_filter.bias"], padding=weight.shape[-1] - 1,
                  groups=weight.shape[0])[..., :l_filter]  # fmt: skip
    *x, v = uc.split(d, dim=1)
    k = implicit_filter(sd, p + "filter_fn.", l_filter, layer)  # (1, L, (v o))
    k = k[0].reshape(l_filter, d, order - 1).permute(2, 1, 0)  # 'c l (v o) -> c o v l', c = 0
    bias = sd[p + "filter_fn.bias"].reshape(d, order - 1).t()  # '(v o) -> o v'
    bias = bias if layer["bias"] else 0 * bias
    for o, x_i in enumerate(reversed(x[1:])):
        v = fftconv_ref(v * x_i, k[o], bias[o])
    y = (v * x[0]).transpose(1, 2)
    return F.linear(y, sd[p + "out_proj.weight"], sd[p + "out_proj.bias"])


def safari_logits(sd: dict, fields: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """`ConvLMHeadModel(**fields)(input_ids).logits` in eval mode (dropout off)."""
    d, eps = fields["d_model"], fields.get("layer_norm_epsilon", 1e-5)

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (d,), sd[name + ".weight"], sd[name + ".bias"], eps)

    hidden = F.embedding(input_ids, sd["backbone.embeddings.word_embeddings.weight"])
    residual = None
    for i in range(fields["n_layer"]):
        p = f"backbone.layers.{i}."
        residual = hidden if residual is None else hidden + residual
        hidden = hyena_operator(sd, p + "mixer.", norm(residual, p + "norm1"), fields)
        residual = hidden + residual
        hidden = norm(residual, p + "norm2")
        hidden = F.linear(hidden, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
        hidden = F.gelu(hidden, approximate="tanh")
        hidden = F.linear(hidden, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    hidden = norm(hidden + residual, "backbone.ln_f")
    return F.linear(hidden, sd["backbone.embeddings.word_embeddings.weight"])


def safari_greedy(sd: dict, fields: dict, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by repeated full forwards (safari's `recurrence` is not implemented)."""
    ids = prompt
    for _ in range(new_tokens):
        next_id = safari_logits(sd, fields, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


# ------------------------------------------------------------------- safari checkpoints


def safari_state_dict(fields: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in `ConvLMHeadModel(**fields).state_dict()`'s keys and shapes, scaled so
    that every part moves the logits; z drifted off its init (safari trains it), t and δ as
    safari builds them, one Sin frequency tensor shared by its positions, lm_head = embedding."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return std * torch.randn(shape, generator=gen)

    layer = _layer(fields)
    d, order, l_max = fields["d_model"], layer["order"], layer["l_max"]
    g = fields.get("d_inner") or 4 * d
    multiple = fields.get("pad_vocab_size_multiple", 1)
    vocab = -(-fields["vocab_size"] // multiple) * multiple
    width, channels = (order + 1) * d, d * (order - 1)
    emb, hidden, kernel = layer["emb_dim"], layer["filter_order"], layer["short_filter_order"]

    t = torch.linspace(0, 1, l_max)[None, :, None]
    bands = (emb - 1) // 2
    w = 2 * math.pi * torch.linspace(0, l_max - 1, l_max)[None, :, None] / l_max
    f = torch.linspace(1e-4, bands - 1, bands)[None, None]
    z = torch.exp(-1j * f * w)
    z = torch.cat([t, z.real, z.imag], dim=-1)
    target = layer.get("target", 1e-2)
    max_decay = math.log(target) / layer.get("fast_decay_pct", 0.3)
    min_decay = math.log(target) / layer.get("slow_decay_pct", 1.5)
    deltas = torch.linspace(min_decay, max_decay, channels)[None, None]

    # Logits of a few units; the mixers' and MLPs' outputs outweigh the embedding (a random
    # tied model otherwise mostly repeats its last token).
    embedding = randn(vocab, d, std=0.3)
    sd = {"backbone.embeddings.word_embeddings.weight": embedding}
    for i in range(fields["n_layer"]):
        p = f"backbone.layers.{i}."
        for name in ("norm1", "norm2"):
            sd[f"{p}{name}.weight"] = 1 + randn(d, std=0.2)
            sd[f"{p}{name}.bias"] = randn(d, std=0.2)
        m = p + "mixer."
        sd[m + "in_proj.weight"] = randn(width, d, std=d**-0.5)
        sd[m + "in_proj.bias"] = randn(width, std=0.2)
        sd[m + "out_proj.weight"] = randn(d, d, std=d**-0.5)
        sd[m + "out_proj.bias"] = randn(d, std=0.2)
        sd[m + "short_filter.weight"] = randn(width, 1, kernel, std=0.6)
        sd[m + "short_filter.bias"] = randn(width, std=0.2)
        fp = m + "filter_fn."
        sd[fp + "bias"] = randn(channels)
        sd[fp + "pos_emb.z"] = z + randn(*z.shape, std=0.05)
        sd[fp + "pos_emb.t"] = t.clone()
        sd[fp + "implicit_filter.0.weight"] = randn(hidden, emb, std=emb**-0.5)
        sd[fp + "implicit_filter.0.bias"] = randn(hidden, std=0.2)
        freq = 14 + randn(1, hidden)
        n_inner = layer["num_inner_mlps"]
        for k in range(1, n_inner + 1):
            sd[f"{fp}implicit_filter.{2 * k}.weight"] = randn(hidden, hidden, std=hidden**-0.5)
            sd[f"{fp}implicit_filter.{2 * k}.bias"] = randn(hidden, std=0.2)
        for k in range(n_inner + 1):
            sd[f"{fp}implicit_filter.{2 * k + 1}.freq"] = freq  # one shared Sin module
        last = 2 * n_inner + 2
        sd[f"{fp}implicit_filter.{last}.weight"] = randn(channels, hidden, std=0.3 * hidden**-0.5)
        sd[fp + "modulation.deltas"] = deltas.clone()
        sd[p + "mlp.fc1.weight"] = randn(g, d, std=d**-0.5)
        sd[p + "mlp.fc1.bias"] = randn(g, std=0.2)
        sd[p + "mlp.fc2.weight"] = randn(d, g, std=3 * g**-0.5)
        sd[p + "mlp.fc2.bias"] = randn(d, std=0.2)
    sd["backbone.ln_f.weight"] = 1 + randn(d, std=0.2)
    sd["backbone.ln_f.bias"] = randn(d, std=0.2)
    sd["lm_head.weight"] = embedding  # tied: the same tensor, as in safari's state_dict()
    return sd


def write_safari(folder: Path, fields: dict, sd: dict, fmt: str) -> Path:
    """A safari folder: config.json and model.safetensors (each tensor stored once: the shared
    ones cloned, lm_head left out) or pytorch_model.bin (`torch.save` of the plain dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fields))
    if fmt == "safetensors":
        tensors = {k: v.clone().contiguous() for k, v in sd.items() if k != "lm_head.weight"}
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        torch.save(dict(sd), folder / "pytorch_model.bin")
    return folder


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("fields", "fmt"),
    [(RELEASED_LIKE, "safetensors"), (EVERY_OPTION, "bin")],
    ids=["released", "every-option"],
)
def test_converted_model_matches_safari_logits_and_greedy_decoding(tmp_path, fields, fmt):
    sd = safari_state_dict(fields)
    src = write_safari(tmp_path / "safari", fields, sd, fmt)
    assert convert_checkpoint(src, tmp_path / "zoo") == DIRECTION
    assert zoo.HyenaConfig  # `import zoo` registered the Auto classes
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    assert isinstance(model, zoo.HyenaForCausalLM)
    assert model.config.norm_type == "layernorm"
    assert model.config.channel_mixers == ["gelu_mlp"] * fields["n_layer"]

    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (2, 37), generator=gen)
    with torch.no_grad():
        expected = safari_logits(sd, fields, input_ids)
        logits = model(input_ids, use_cache=False).logits
    assert expected.abs().max() > 1.0
    # Measured (fp32, CPU, 1 to 8 threads): max |difference| 5.4e-6 (released-like; logits up
    # to 7), 1.2e-6 (every option). safari's own fp32 forward is 6e-4 from its fp64 one here.
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)

    prompt = torch.randint(0, vocab, (2, 8), generator=gen)
    with torch.no_grad():
        reference = safari_greedy(sd, fields, prompt, 20)
        model.generation_config.eos_token_id = None
        out = model.generate(
            prompt, max_new_tokens=20, do_sample=False, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        # Each cached decode step's logits against safari's full forward over the same prefix.
        steps = torch.stack(out.logits, dim=1)  # (B, 20, V)
        full = safari_logits(sd, fields, reference[:, :-1])[:, 7:]  # (B, 20, V)
    assert torch.equal(out.sequences, reference)
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=0)


def test_the_released_config_maps_to_zoo_settings():
    config = config_from_safari(
        {**RELEASED_LIKE, "d_model": 864, "d_inner": 1728, "n_layer": 18, "vocab_size": 50257,
         "layer": {**RELEASED_LIKE["layer"], "emb_dim": 33, "filter_order": 64, "l_max": 2048}}
    )  # fmt: skip
    assert config.vocab_size == 50264  # 50257 padded to a multiple of 8
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (
        864,
        18,
        1728,
    )
    assert config.max_position_embeddings == 2048
    assert (config.hyena_emb_dim, config.hyena_filter_order, config.hyena_short_filter) == (
        33,
        64,
        3,
    )
    assert not config.hyena_modulate and config.hyena_learned_pos_emb
    assert config.rms_norm_eps == 1e-5 and config.tie_word_embeddings


def test_only_the_safari_format_claims_a_safari_folder():
    claimed = [fmt.name for fmt in foreign_formats() if fmt.matches(RELEASED_LIKE)]
    assert claimed == ["safari_hyena"]
    assert FORMAT.direction == DIRECTION
    mamba_ssm = {"d_model": 32, "n_layer": 2, "vocab_size": 50, "ssm_cfg": {}}
    assert not matches(mamba_ssm)
    assert not matches({**RELEASED_LIKE, "model_type": "zoo_hyena"})


def _with(fields: dict, **changes) -> dict:
    """`fields` with top-level changes; `layer__x=v` changes the layer's field x."""
    out = {**fields, "layer": dict(fields["layer"])}
    for key, value in changes.items():
        if key.startswith("layer__"):
            out["layer"][key.removeprefix("layer__")] = value
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"checkpoint_mixer": True}, "checkpoint_mixer"),
        ({"layer__train_freq": False}, "layer.train_freq"),
        ({"layer___name_": "h3"}, "layer._name_"),
        ({"layer__num_heads": 2}, "layer.num_heads"),
        ({"layer__outer_mixing": True}, "layer.outer_mixing"),
        ({"layer__post_order_ffn": True}, "layer.post_order_ffn"),
        ({"layer__activation": "gelu"}, "layer.activation"),
        ({"layer__modulate": True, "layer__modulation_lr": 1e-3}, "layer.modulation_lr"),
        ({"attn_layer_idx": [1]}, "attn_layer_idx"),
        ({"max_position_embeddings": 2048}, "max_position_embeddings"),
    ],
)
def test_what_zoo_cannot_express_is_refused_before_weights_are_read(tmp_path, changes, field):
    src = tmp_path / "safari"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_with(RELEASED_LIKE, **changes)))
    (src / "pytorch_model.bin").write_bytes(b"not a checkpoint: must never be opened")
    with pytest.raises(ValueError, match=rf"^safari hyena config field {field}=") as caught:
        convert_checkpoint(src, tmp_path / "zoo")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "zoo").exists()


def test_weights_zoo_cannot_hold_are_refused_naming_the_key(tmp_path):
    fields = _with(RELEASED_LIKE, layer__modulate=True)
    sd = safari_state_dict(fields)
    sd["backbone.layers.1.mixer.filter_fn.implicit_filter.3.freq"] = torch.full((1, 16), 14.0)
    src = write_safari(tmp_path / "freq", fields, sd, "bin")
    with pytest.raises(ValueError, match=r"implicit_filter\.3\.freq.*one Sin frequency"):
        from_safari_hyena(src)

    sd = safari_state_dict(fields)
    sd["backbone.layers.0.mixer.filter_fn.modulation.deltas"] *= 1.5  # a trained decay
    src = write_safari(tmp_path / "deltas", fields, sd, "bin")
    with pytest.raises(ValueError, match=r"modulation\.deltas.*differs from the fixed values"):
        from_safari_hyena(src)

    sd = safari_state_dict(fields)
    sd["backbone.layers.0.mixer.kernel.B"] = torch.zeros(3)
    src = write_safari(tmp_path / "extra", fields, sd, "bin")
    with pytest.raises(ValueError, match=r"'backbone\.layers\.0\.mixer\.kernel\.B' has no place"):
        from_safari_hyena(src)


def test_a_pickle_holding_more_than_tensors_is_refused(tmp_path):
    src = tmp_path / "safari"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(RELEASED_LIKE))
    with open(src / "pytorch_model.bin", "wb") as handle:  # a global: code a pickle would run
        pickle.dump({"weights": print}, handle, protocol=2)
    with pytest.raises(ValueError, match="refused, not a plain tensor checkpoint"):
        convert_checkpoint(src, tmp_path / "zoo")
