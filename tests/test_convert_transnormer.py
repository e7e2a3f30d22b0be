"""Released TransNormerLLM checkpoints (OpenNLPLab, remote code) convert to zoo's TNL exactly.

The reference below is an independent forward written from OpenNLPLab's `modeling_transnormer.py`
(TransnormerLLM repository; the 2024 revision also vendored as `smoe/models/tnl/` of
weigao266/TNL-MoE), its training-mode path: the decay matrix exp(slope_h · (1 − l/(L−1) + 1e-5) ·
(s − t)) on s ≤ t times (q kᵀ), SiLU on q and k, LRPE `cat(x cos(θ t), x sin(θ t))` with θ
(H, 1, D) in the layers of `linear_use_lrpe_list`, `u ⊙ SimpleRMSNorm(o)` before `out_proj`, the
activation-free GLU `l3(l1(x) ⊙ l2(x))`, SimpleRMSNorm (eps 1e-6, no weight) before each mixer
and at the end, embeddings times √d unless `no_scale_embedding`. Key names in, logits out; no
zoo code is used in it. The tiny checkpoints are written in the released layout (config.json
with `model_type "transnormer"`, the released key names).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

import zoo
from zoo.cli import app
from zoo.convert import convert_checkpoint
from zoo.convert.transnormer import config_from_transnormer

runner = CliRunner()
V, D, H, L, G = 97, 32, 4, 3, 48


def released_config(**overrides) -> dict:
    return {
        "model_type": "transnormer",
        "architectures": ["TransnormerForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_transnormer.TransnormerConfig"},
        "vocab_size": V,
        "decoder_embed_dim": D,
        "decoder_layers": L,
        "decoder_attention_heads": H,
        "hidden_dim": D,
        "glu_dim": G,
        "norm_type": "simplermsnorm",
        "linear_act_fun": "silu",
        "linear_use_lrpe_list": [1] + [0] * (L - 1),
        "no_scale_embedding": False,
        "bias": False,
        "init_std": 0.02,
        "add_bos_token": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        **overrides,
    }


def released_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    d, g = config["decoder_embed_dim"], config["glu_dim"]
    heads, layers = config["decoder_attention_heads"], config["decoder_layers"]

    def rand(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return torch.randn(*shape, generator=gen) * scale

    sd = {"model.embed_tokens.weight": rand(config["vocab_size"], d, scale=0.3)}
    for i in range(layers):
        p = f"model.layers.{i}"
        sd[f"{p}.token_mixer.qkvu_proj.weight"] = rand(4 * d, d)
        sd[f"{p}.token_mixer.out_proj.weight"] = rand(d, d)
        if config["linear_use_lrpe_list"][i]:
            theta = 10000 ** (-2 / d * torch.arange(d, dtype=torch.float32))
            sd[f"{p}.token_mixer.lrpe.theta"] = (theta * (0.5 + torch.rand(d, generator=gen))).view(
                heads, 1, -1
            )
        sd[f"{p}.channel_mixer.l1.weight"] = rand(g, d)
        sd[f"{p}.channel_mixer.l2.weight"] = rand(g, d)
        sd[f"{p}.channel_mixer.l3.weight"] = rand(d, g)
    if not config.get("tie_word_embeddings", True):
        sd["lm_head.weight"] = rand(config["vocab_size"], d)
    return sd


def write_released(folder, config: dict, sd: dict, *, bin_file: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if bin_file:
        torch.save(sd, folder / "pytorch_model.bin")  # a plain dict of tensors, as released
    else:
        save_file(sd, folder / "model.safetensors")
    return folder


# ------------------------------------------------------------------ the reference (released code)


def _alibi_slopes(n: int) -> list[float]:
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _alibi_slopes(2 * closest)[0::2][: n - closest]


def _srms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def reference_logits(config: dict, sd: dict, ids: torch.Tensor) -> torch.Tensor:
    d, heads, layers = (
        config["decoder_embed_dim"],
        config["decoder_attention_heads"],
        config["decoder_layers"],
    )
    b, n = ids.shape
    scale = 1.0 if config["no_scale_embedding"] else math.sqrt(d)
    x = scale * F.embedding(ids, sd["model.embed_tokens.weight"])
    slopes = torch.tensor(_alibi_slopes(heads)).reshape(heads, 1, 1)
    t = torch.arange(n)
    rel = (t[None, :] - t[:, None]).float()  # s − t: 0 on the diagonal, negative below
    mask = torch.where(t[None, :] <= t[:, None], rel, torch.tensor(float("-inf")))
    for i in range(layers):
        p = f"model.layers.{i}"
        q, k, v, u = F.linear(_srms(x), sd[f"{p}.token_mixer.qkvu_proj.weight"]).chunk(4, -1)
        q, k, v = (z.view(b, n, heads, -1).transpose(1, 2) for z in (q, k, v))  # b h n d
        q, k = F.silu(q), F.silu(k)
        if config["linear_use_lrpe_list"][i]:
            angle = sd[f"{p}.token_mixer.lrpe.theta"] * t.reshape(1, -1, 1)  # h n d
            q = torch.cat([q * angle.cos(), q * angle.sin()], dim=-1)
            k = torch.cat([k * angle.cos(), k * angle.sin()], dim=-1)
        slope = slopes * (1 - i / (layers - 1) + 1e-5)
        decay = torch.exp(slope * mask)  # h n n
        o = torch.einsum("bhnm,bhme->bhne", torch.einsum("bhnd,bhmd->bhnm", q, k) * decay, v)
        o = _srms(o.transpose(1, 2).reshape(b, n, d))
        x = x + F.linear(u * o, sd[f"{p}.token_mixer.out_proj.weight"])
        h = _srms(x)
        glu = F.linear(h, sd[f"{p}.channel_mixer.l1.weight"]) * F.linear(
            h, sd[f"{p}.channel_mixer.l2.weight"]
        )
        x = x + F.linear(glu, sd[f"{p}.channel_mixer.l3.weight"])
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return F.linear(_srms(x), head)


def reference_greedy(config, sd, prompt, new_tokens: int, eos: int) -> torch.Tensor:
    ids = prompt
    for _ in range(new_tokens):
        logits = reference_logits(config, sd, ids)[:, -1]
        logits[:, eos] = float("-inf")  # what min_new_tokens does to generate
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def ids(seed: int, length: int = 23, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("overrides", "bin_file"),
    [
        pytest.param({}, False, id="released-layout"),
        pytest.param(
            {
                "tie_word_embeddings": False,
                "no_scale_embedding": True,
                "linear_use_lrpe_list": [0, 1, 1],
            },
            True,
            id="untied-unscaled-bin",
        ),
    ],
)
def test_released_checkpoint_converts_exactly(tmp_path, overrides, bin_file):
    config = released_config(**overrides)
    sd = released_weights(config)
    src = write_released(tmp_path / "released", config, sd, bin_file=bin_file)
    assert convert_checkpoint(src, tmp_path / "zoo") == "transnormer->zoo_tnl"
    model = zoo.TNLForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    assert model.config.model_type == "zoo_tnl"
    x = ids(seed=1, length=150)  # three chunks of the chunked form (64 tokens each)
    with torch.no_grad():
        got = model(x).logits
    expected = reference_logits(config, sd, x)
    # Measured: max |Δ| 3.5e-6 (logits up to 11) and 5.2e-6 (up to 4), fp32; 0 within one chunk.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    prompt = ids(seed=2, length=5)
    with torch.no_grad():
        generated = model.generate(
            prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
        )
    assert generated.shape == (2, 25)
    assert torch.equal(generated, reference_greedy(config, sd, prompt, 20, eos=2))


def test_converted_model_loads_through_auto_class(tmp_path):
    import transformers

    config = released_config()
    src = write_released(tmp_path / "released", config, released_weights(config))
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "zoo")])
    assert result.exit_code == 0, result.output
    assert "(transnormer->zoo_tnl)" in result.output
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "zoo")
    assert isinstance(model, zoo.TNLForCausalLM)
    assert model.config.output_gate == "linear"
    assert model.config.layer_overrides[0] == {"lightning_lrpe": True}
    assert model.config.embedding_multiplier == pytest.approx(math.sqrt(D))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("norm_type", "layernorm"),
        ("linear_act_fun", "elu"),
        ("bias", True),
        ("hidden_dim", 2 * D),
        ("linear_use_lrpe_list", [1, 0]),
        ("use_moe", True),  # a field this converter does not know
    ],
)
def test_inexpressible_configs_are_refused_before_any_weight_is_read(tmp_path, field, value):
    src = tmp_path / "released"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(released_config(**{field: value})))
    # No weight file at all: the refusal must come from config.json alone.
    with pytest.raises(ValueError, match=rf"^transnormer config field {field}=") as info:
        convert_checkpoint(src, tmp_path / "zoo")
    assert "\n" not in str(info.value)
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "zoo2")])
    assert result.exit_code == 2 and field in result.output


def test_seven_b_config_maps_to_the_released_shape():
    """The released 7B's shape (30 layers of width 4096, 32 heads, GLU 11008, vocab 64000; LRPE
    in layer 0) as zoo settings; the parameter count is the released architecture's own."""
    fields = released_config(
        vocab_size=64000, decoder_embed_dim=4096, decoder_layers=30, decoder_attention_heads=32,
        hidden_dim=4096, glu_dim=11008, linear_use_lrpe_list=[1] + [0] * 29,
    )  # fmt: skip
    config = config_from_transnormer(fields)
    with torch.device("meta"):
        model = zoo.TNLForCausalLM(config)
    d, g, layers, vocab = 4096, 11008, 30, 64000
    released = vocab * d + layers * (4 * d * d + d * d + 3 * d * g) + d  # + layer 0's θ (H·D)
    assert model.num_parameters() == released  # tied head: counted once, as the released


def test_converted_model_runs_under_zoo_eval_and_lm_eval(tmp_path):
    """A converted checkpoint (with its tokenizer carried along) is scored by `zoo eval` and by
    lm-eval's model class `zoo`, whose log-likelihood is the released network's."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from zoo.eval.lm_eval_adapter import ZooLM
    from zoo.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    special = {
        f"{name}_token_id": getattr(tok, f"{name}_token_id") for name in ("bos", "eos", "pad")
    }
    config = released_config(vocab_size=len(tok), **special)
    sd = released_weights(config)
    src = write_released(tmp_path / "released", config, sd)
    tok.save_pretrained(src)
    dst = tmp_path / "zoo"
    convert_checkpoint(src, dst)
    assert (dst / "tokenizer.json").is_file()

    fixtures = Path(__file__).parent / "eval" / "fixtures"
    result = runner.invoke(app, ["eval", str(dst), "--tasks", "piqa", "--data-dir",
                                 str(fixtures), "--output", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["piqa"]
    assert 0.0 <= scores["acc,none"] <= 1.0

    lm = ZooLM(pretrained=str(dst), batch_size=1)
    context, continuation = "The cat sat on", " the mat."
    [(got, _)] = lm.loglikelihood(
        [Instance("loglikelihood", {}, (context, continuation), 0)], disable_tqdm=True
    )
    whole = lm.tok_encode(context + continuation)
    n = len(whole) - len(lm.tok_encode(context))
    logprobs = reference_logits(config, sd, torch.tensor([whole[:-1]])).log_softmax(-1)[0]
    expected = logprobs[-n:].gather(-1, torch.tensor(whole[-n:])[:, None]).sum().item()
    assert got == pytest.approx(expected, abs=1e-4)
