"""zoo.convert on fla's HGRN2 checkpoints (`fla.models.HGRN2ForCausalLM.save_pretrained`):
the converted zoo HGRN2 gives fla's logits and greedy continuations, and what zoo's HGRN2
cannot express is refused from config.json alone; plus the mixer settings that express fla's
variant (q scale, output norm and its eps).

How fla runs here: fla's own code, unpatched, on fla's own Triton kernels. On the CPU,
tests/conftest.py turns Triton's interpreter on (TRITON_INTERPRET=1); the one change this file
makes is Triton's autotuner trying only the first config of each kernel (it cannot time configs
without a GPU driver). fla's HGRN2 runs its `fused_recurrent` gla kernel for inputs of up to 64
tokens (`chunk` beyond, which the interpreter cannot run), so every input here stays at or under
64 tokens, prompts plus generated tokens included; its fused RMSNorm, `rms_norm_linear`, swish and
SwiGLU kernels run as they are. With CUDA, fla runs natively on the GPU and zoo on the CPU
(that case was written without a GPU to run it on).

Measured (fp32, CPU, torch 2.x, this file's inputs): max |zoo − fla| logit difference 4.5e-6
(released layout) and 3.2e-6 (tied, gain-free output norm) on logits up to 3.0 and 3.7; asserted
<= 1e-5. That is float32 rounding: the same zoo model in float64 is 3.5e-6 from zoo's float32
logits and 3.5e-6 from fla's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import zoo
from tests.fla_support import give_transformers_its_model_types_back, one_autotune_config
from zoo.cli import app
from zoo.convert import convert_checkpoint
from zoo.convert.fla_hgrn2 import FORMAT, config_from_fla, state_dict_from_fla
from zoo.layers.context import MixerContext
from zoo.layers.hgrn2 import HGRN2Attention

fla_models = pytest.importorskip("fla.models", reason="needs flash-linear-attention")


give_transformers_its_model_types_back()

ATOL = 1e-5
VOCAB, HIDDEN, LAYERS = 100, 64, 3
FLA_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def fla_runs_here():
    """fla's Triton kernels under the interpreter: one autotune config each (see the module
    docstring); undone after this module."""
    with one_autotune_config():
        yield


def fla_hgrn2(seed: int = 0, **fields) -> torch.nn.Module:
    """A tiny fla HGRN2 in fp32 whose every weight matters: random lower bounds Γ and norm gains
    (both start constant), weights large enough for logits of order 1."""
    config = fla_models.HGRN2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        expand_ratio=16,  # 4 heads of a 16 x 16 state
        initializer_range=0.1,
        **fields,
    )
    torch.manual_seed(seed)
    model = fla_models.HGRN2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "model.lower_bounds":
                param.copy_(torch.randn(param.shape, generator=gen))
            elif "norm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))
    model.generation_config.eos_token_id = None  # an untrained model may emit </s>
    return model


def ids(seed: int = 0, batch: int = 2, length: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def fla_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.to(FLA_DEVICE)(input_ids=input_ids.to(FLA_DEVICE)).logits.cpu()


def convert(model, folder: Path, **save) -> zoo.ZooForCausalLM:
    """save_pretrained (safetensors), `zoo convert`, and the result loaded the usual way."""
    from transformers import AutoModelForCausalLM

    model.to("cpu").save_pretrained(folder / "fla", **save)
    assert convert_checkpoint(folder / "fla", folder / "zoo") == "fla_hgrn2->zoo_hgrn2"
    return AutoModelForCausalLM.from_pretrained(folder / "zoo").eval()


@pytest.mark.parametrize(
    "fields",
    [{}, {"tie_word_embeddings": True, "elementwise_affine": False, "intermediate_size": 96}],
    ids=["released-layout", "tied-gain-free-output-norm"],
)
def test_converted_model_gives_fla_logits_and_greedy_tokens(tmp_path, fields):
    fla = fla_hgrn2(**fields)
    model = convert(fla, tmp_path)
    assert isinstance(model, zoo.HGRN2ForCausalLM)
    config = model.config
    assert (config.hgrn2_q_scale, config.hgrn2_output_norm_eps) == ("rsqrt_dim", 1e-5)
    assert config.hgrn2_output_norm == ("srmsnorm" if fields else "rmsnorm")
    assert config.channel_mixers == ["swiglu"] * LAYERS and config.norm_type == "rmsnorm"
    assert model.model.hgrn2_lower_bounds.dtype == torch.float32
    x = ids()
    expected = fla_logits(fla, x)
    with torch.no_grad():
        got = model(input_ids=x).logits
    assert expected.abs().max() > 0.5  # logits of order 1: atol 1e-5 is a tight check
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL, f"max abs logit difference {diff:.3g} > {ATOL}"
    # ... and fla's settings are what makes it so: without its q scale, or with the output
    # norm's eps at norm_eps (1e-6) instead of 1e-5, the logits move by about 1e-3.
    mixers = [layer.mixer for layer in model.model.layers]
    norms = [mixer.norm for mixer in mixers]
    for modules, name, value in ((mixers, "q_scale", 1.0), (norms, "eps", 1e-6)):
        kept = [getattr(module, name) for module in modules]
        for module in modules:
            setattr(module, name, value)
        with torch.no_grad():
            moved = (model(input_ids=x).logits - expected).abs().max().item()
        for module, old in zip(modules, kept, strict=True):
            setattr(module, name, old)
        assert moved > 1e-4, f"{name}={value} moves the logits by only {moved:.3g}"
    # Greedy decoding: zoo's generate (its recurrent cache) against fla's greedy choices. fla's
    # model is causal, so one forward over the whole continuation gives its choice after every
    # prefix: fla decodes greedily to the same tokens exactly when each new token is its argmax
    # after the tokens before it. (fla's own `generate`, its cached decode, disagrees with its
    # full forwards from the second new token on under the Triton interpreter.)
    prompt = ids(seed=3, length=8)
    with torch.no_grad():
        tokens = model.generate(
            prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None
        )
    assert tokens.shape == (2, 28) and torch.equal(tokens[:, :8], prompt)
    choices = fla_logits(fla, tokens[:, :-1])[:, 7:].argmax(-1)  # (2, 20)
    assert torch.equal(tokens[:, 8:], choices)


def test_sharded_checkpoint_converts(tmp_path):
    fla = fla_hgrn2(seed=1)
    model = convert(fla, tmp_path, max_shard_size="200KB")
    assert len(list((tmp_path / "fla").glob("model-*.safetensors"))) > 1
    x = ids(seed=1, length=17)
    with torch.no_grad():
        diff = (model(input_ids=x).logits - fla_logits(fla, x)).abs().max().item()
    assert diff <= ATOL


def test_config_mapping():
    fields = {
        "model_type": "hgrn2",
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "expand_ratio": None,
        "num_heads": 2,
        "hidden_ratio": 3,
        "norm_eps": 1e-5,
        "use_l2warp": False,
        "fuse_norm": True,
        "attn_mode": "fused_chunk",
        "_name_or_path": "fla-hub/hgrn2-tiny",
    }
    config = config_from_fla(fields)
    assert FORMAT.matches(fields) and not FORMAT.matches({"model_type": "zoo_hgrn2"})
    assert (config.hgrn2_expand_ratio, config.num_attention_heads) == (128, 2)
    assert config.intermediate_size == 512  # fla's MLP: int(256 * 3 * 2 / 3) rounded up to 256
    assert config.rms_norm_eps == 1e-5 and config.hgrn2_output_norm_eps == 1e-5
    # fla's defaults where a field is absent: vocabulary, untied head, token ids, eps.
    default = config_from_fla({"model_type": "hgrn2"})
    assert (default.vocab_size, default.hidden_size, default.hgrn2_expand_ratio) == (
        32000,
        2048,
        128,
    )
    assert (default.intermediate_size, default.tie_word_embeddings) == (5632, False)
    assert (default.bos_token_id, default.eos_token_id, default.pad_token_id) == (1, 2, None)
    assert default.rms_norm_eps == 1e-6


def test_l2warp_is_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="zoo.convert.fla_hgrn2"):
        config_from_fla(
            {"model_type": "hgrn2", "hidden_size": 64, "expand_ratio": 16, "use_l2warp": True}
        )
    assert "use_l2warp" in caplog.text


def test_unknown_state_dict_key_is_refused():
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.attn\.q_conv1d\.weight'"):
        state_dict_from_fla({"model.layers.0.attn.q_conv1d.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"use_short_conv": True}, "use_short_conv"),
        ({"use_lower_bound": False}, "use_lower_bound"),
        ({"attn": {"layers": [1], "num_heads": 4}}, "attn"),
        ({"attnres_block_size": 2}, "attnres_block_size"),
        ({"hidden_act": "powlu"}, "hidden_act"),
        ({"expand_ratio": 24}, "expand_ratio"),
        ({"expand_ratio": None, "num_heads": 3}, "num_heads"),
        ({"attn_mode": "parallel"}, "attn_mode"),
        ({"mystery": 1}, "mystery"),
    ],
    ids=[
        "short-conv",
        "no-lower-bound",
        "hybrid",
        "attnres",
        "activation",
        "ratio",
        "heads",
        "mode",
        "unknown",
    ],
)
def test_refused_in_one_line_before_any_weight_is_read(tmp_path, override, field):
    # config.json alone, no weight file: a refusal that reached the weights would be
    # a FileNotFoundError about model.safetensors instead.
    fields = json.loads(
        fla_models.HGRN2Config(hidden_size=HIDDEN, expand_ratio=16).to_json_string()
    )
    src = tmp_path / "fla"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**fields, **override}))
    with pytest.raises(ValueError) as refused:
        convert_checkpoint(src, tmp_path / "out")
    message = str(refused.value)
    assert "\n" not in message and f"fla hgrn2 config field {field}=" in message, message
    assert not (tmp_path / "out").exists()
    if field == "use_short_conv":  # the command says the same in one line, exit status 2
        result = runner.invoke(app, ["convert", str(src), str(tmp_path / "out")])
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], lines


# ------------------------------------------------------------------------- the mixer settings


def _mixer(**settings) -> HGRN2Attention:
    config = zoo.HGRN2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, hgrn2_expand_ratio=16, **settings
    )
    torch.manual_seed(0)
    return HGRN2Attention(config, layer_idx=1).eval()


def test_q_scale_and_output_norm_eps_act_as_documented():
    # q · e^(-1/2) scales y by e^(-1/2); an RMSNorm of c·y with eps ε is the RMSNorm of y with
    # eps ε / c², so the scaled mixer with eps ε is the unscaled one with eps ε · e (e = 16).
    x = 0.05 * torch.randn(2, 13, HIDDEN, generator=torch.Generator().manual_seed(0))
    context = MixerContext.build(None, None, 2, 13, 0, x.device)
    context.parameters["hgrn2_lower_bounds"] = torch.randn(2, HIDDEN)
    eps = 1e-3
    scaled = _mixer(hgrn2_q_scale="rsqrt_dim", hgrn2_output_norm_eps=eps)
    unscaled = _mixer(hgrn2_output_norm_eps=eps * 16)
    plain = _mixer(hgrn2_output_norm_eps=eps)
    with torch.no_grad():
        out = scaled(x, context)
        torch.testing.assert_close(out, unscaled(x, context), atol=1e-6, rtol=1e-5)
        assert (out - plain(x, context)).abs().max() > 1e-3  # the eps matters at this scale
        torch.testing.assert_close(out, scaled.reference_forward(x, context), atol=1e-6, rtol=1e-5)
    assert scaled.norm.eps == eps and _mixer().norm.eps == 1e-6  # None = rms_norm_eps


def test_output_norm_setting_picks_the_norm():
    # The preset's norm_type is gain-free SRMSNorm; "config" follows it, the others override it.
    assert _mixer().norm.weight is None
    assert _mixer(hgrn2_output_norm="rmsnorm").norm.weight is not None
    assert _mixer(norm_type="rmsnorm", hgrn2_output_norm="srmsnorm").norm.weight is None
    with pytest.raises(ValueError, match="hgrn2_output_norm='layernorm'"):
        _mixer(hgrn2_output_norm="layernorm")
