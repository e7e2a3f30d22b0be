"""The fast decode path (`zoo.decode`): `generate(cache_implementation="static")` runs a static
cache and a compiled per-token step, and gives exactly the greedy tokens of the default path,
padded batches included; its step traces without a graph break."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, StaticCache
from typer.testing import CliRunner

import zoo
from tests.tiny import FAMILIES, tiny_config, tiny_mixer_config
from zoo.cli import app
from zoo.decode import ahead_of_time_config, decode_linears
from zoo.tokenizer import PAD_ID, byte_tokenizer

MOE_ESCAPE = "zoo/layers/moe.py"


def _model(family: str) -> zoo.ZooForCausalLM:
    """A tiny model of a family, or ("mixer:NAME") three blocks of one mixer."""
    torch.manual_seed(0)
    config = (
        tiny_mixer_config(family.removeprefix("mixer:"))
        if family.startswith("mixer:")
        else tiny_config(family)
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    return model


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    long, short = torch.randint(3, 256, (1, 13)), torch.randint(3, 256, (1, 7))
    batch = torch.cat([long, torch.cat([torch.full((1, 6), PAD_ID), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    return batch, mask, long, short


@pytest.mark.parametrize("family", [*FAMILIES, "mixer:gla"])
def test_compiled_static_generate_gives_the_eager_greedy_tokens(family):
    model = _model(family)
    batch, mask, long, short = _padded_batch()
    options = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": PAD_ID}
    eager = model.generate(batch, attention_mask=mask, **options)
    torch._dynamo.reset()  # each test compiles its own model's step
    fast = model.generate(batch, attention_mask=mask, cache_implementation="static", **options)
    assert torch.equal(fast, eager)
    # Per-row lengths: the padded row decodes as it does alone, through the same compiled step.
    alone = model.generate(short, cache_implementation="static", **options)
    assert torch.equal(fast[1, 6:], alone[0])
    assert torch.equal(model.generate(long, cache_implementation="static", **options)[0], fast[0])


@pytest.mark.parametrize("family", ["llama", "tnl", "mamba", "hyena", "hybrid"])
def test_ahead_of_time_step_gives_the_eager_greedy_tokens(family):
    """The AOTInductor step: a padded batch and each of its rows alone (two compiled steps: the
    shapes differ) give the eager path's greedy tokens."""
    model = _model(family)
    batch, mask, long, short = _padded_batch()
    options = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": PAD_ID}
    eager = model.generate(batch, attention_mask=mask, **options)
    aot = {"cache_implementation": "static", "compile_config": ahead_of_time_config(), **options}
    fast = model.generate(batch, attention_mask=mask, **aot)
    assert torch.equal(fast, eager)
    assert torch.equal(model.generate(short, **aot)[0], fast[1, 6:])
    assert torch.equal(model.generate(long, **aot)[0], fast[0])


@pytest.mark.parametrize("batch", [1, 2])
def test_ahead_of_time_step_reads_the_weights_and_cache_of_each_call(batch, caplog):
    """The compiled library reads the model's weights in place: after a change of the weights
    (and with a new cache per call) the same library gives the new model's greedy tokens; one
    row (compiled reductions) and a batch (oneDNN's products) alike."""
    model = _model("tnl")
    ids = torch.randint(3, 256, (batch, 9))
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD_ID}
    aot = {"cache_implementation": "static", "compile_config": ahead_of_time_config(), **options}
    with caplog.at_level("INFO", logger="zoo.decode"):
        assert torch.equal(model.generate(ids, **aot), model.generate(ids, **options))
        with torch.no_grad():
            layer = model.model.layers[0]
            changing = [model.lm_head.weight, layer.mixer.q_proj.weight]
            changing += list(layer.channel_mixer.parameters())
            for weight in changing:
                weight.mul_(-1.5)
        changed = model.generate(ids, **options)
        assert torch.equal(model.generate(ids, **aot), changed)
        assert torch.equal(model.generate(ids, **aot), changed)
    assert sum("ahead of time" in r.message for r in caplog.records) == 1  # compiled once


def test_ahead_of_time_falls_back_to_torch_compile_for_moe(caplog):
    """A MoE layer's routing has data-dependent shapes, which an export cannot fix: the step is
    `torch.compile`'s, said in a warning, and the tokens are still the eager ones."""
    torch.manual_seed(0)
    config = zoo.HybridConfig.from_pattern(
        "lightning:moe attention:swiglu",
        num_experts=4, num_experts_per_tok=2, hidden_size=32, num_attention_heads=4,
        vocab_size=300, intermediate_size=48, moe_intermediate_size=24,
        max_position_embeddings=64, lightning_chunk_size=8,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 256, (2, 9))
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": PAD_ID}
    eager = model.generate(ids, **options)
    with caplog.at_level("WARNING", logger="zoo.decode"):
        fast = model.generate(
            ids, cache_implementation="static", compile_config=ahead_of_time_config(), **options
        )
    assert torch.equal(fast, eager)
    assert any("torch.compile" in r.message for r in caplog.records)


@pytest.mark.parametrize("family", ["llama", "tnl", "mamba", "hyena", "hybrid"])
def test_no_graph_break_in_a_static_decode_step(family):
    model = _model(family)
    ids = torch.randint(3, 200, (2, 12))
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(ids[:, :1], cache=cache, use_cache=True)
    breaks = [
        reason.reason.splitlines()[0]
        for reason in explanation.break_reasons
        if not any(MOE_ESCAPE in frame.filename for frame in reason.user_stack[-1:])
    ]
    assert breaks == []


@pytest.mark.parametrize("family", ["hybrid", "hyena"])
def test_static_cache_logits_equal_the_full_forward(family):
    model = _model(family)
    ids = torch.randint(3, 200, (2, 20))
    full = model(ids, use_cache=False).logits
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        steps = [model(ids[:, :14], cache=cache, use_cache=True).logits]
        steps += [
            model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(14, 20)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_a_static_cache_longer_than_hyenas_filters_is_refused():
    model = _model("hyena")
    slots = model.config.max_position_embeddings + 1
    cache = StaticCache(config=model.config, max_cache_len=slots)
    with pytest.raises(ValueError, match=f"max_cache_len={slots} slots"):
        model(torch.randint(3, 200, (1, 5)), cache=cache, use_cache=True)


def test_decode_linears_keep_the_values_and_restore_the_forward():
    """Eagerly the swapped forward is the plain product; the compiled steps' products (`matvec`
    at one token, oneDNN for a batch in the exported step) are held to the eager tokens by the
    tests above and to `F.linear` by tests/kernels/test_matvec.py."""
    model = _model("llama")
    ids = torch.randint(3, 200, (3, 9))
    with torch.no_grad():
        logits = model(ids).logits
        with decode_linears(model) as changed:
            assert changed == sum(type(m) is torch.nn.Linear for m in model.modules())
            assert "forward" in vars(model.lm_head)
            assert torch.equal(model(ids).logits, logits)
    assert all("forward" not in vars(m) for m in model.modules())
    assert torch.equal(model(ids).logits, logits)


def test_cli_generate_compile_prints_the_greedy_text(tmp_path):
    model = _model("tnl")
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    args = ["generate", str(tmp_path), "--prompt", "copy: ab |", "--max-new-tokens", "8"]
    plain = CliRunner().invoke(app, args)
    torch._dynamo.reset()
    fast = CliRunner().invoke(app, [*args, "--compile"])
    assert plain.exit_code == 0 and fast.exit_code == 0, fast.output
    assert fast.stdout == plain.stdout
    aot = CliRunner().invoke(app, [*args, "--aot"])
    assert aot.exit_code == 0, aot.output
    assert aot.stdout == plain.stdout
