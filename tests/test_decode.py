"""The fast decode path (`zoo.decode`): `generate(cache_implementation="static")` runs a static
cache and a compiled per-token step, and gives exactly the greedy tokens of the default path,
padded batches included; its step traces without a graph break."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache
from transformers.generation.streamers import BaseStreamer
from typer.testing import CliRunner

import zoo
import zoo.decode
from tests.tiny import FAMILIES, tiny_config, tiny_mixer_config
from zoo.cache import recurrent_only, static_masks, static_step_masks
from zoo.cli import app
from zoo.decode import ahead_of_time_config, batched_products_backend, decode_linears
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
    # One compiled step serves every token: a step input whose layout changed from one token to
    # the next would recompile per token (a decode step a hundred times slower). (A MoE model's
    # step is compiled in pieces around its routed experts, which dynamo counts as recompiles.)
    strict = not model.config.has_moe
    with torch._dynamo.config.patch(error_on_recompile=strict):
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


def test_ahead_of_time_step_derives_its_constants_from_the_current_weights():
    """What a step derives from the weights (Mamba's A = −exp(A_log) and transposed Δ
    projection, `decode_constants`) is made anew at every bind: after a change of those weights
    alone the same library gives the changed model's logits."""
    model = _model("mamba")
    with torch.no_grad():  # PyTorch's default init, as mamba_ssm's: the mixers' outputs O(1)
        for block in model.model.layers:
            for name in ("in_proj", "x_proj", "out_proj"):
                getattr(block.mixer, name).reset_parameters()
    ids = torch.randint(3, 256, (1, 9))
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": PAD_ID}
    options |= {"return_dict_in_generate": True, "output_logits": True}
    aot = {"cache_implementation": "static", "compile_config": ahead_of_time_config(), **options}

    def logits(**kwargs):
        return torch.stack(model.generate(ids, **kwargs).logits)

    before = logits(**options)
    torch.testing.assert_close(logits(**aot), before, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for block in model.model.layers:
            block.mixer.A_log.sub_(2.0)
            block.mixer.dt_proj.weight.mul_(50.0)
    after = logits(**options)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(logits(**aot), after, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["aten", "onednn"])
def test_ahead_of_time_batch_multiplies_through_either_backend(backend, monkeypatch):
    """A batch's products in the exported step go through the backend that ran them faster
    here; both give the eager greedy tokens, and the choice is part of what the step is
    compiled for."""
    if backend == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    model = _model("llama")
    batch, mask, *_ = _padded_batch()
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": PAD_ID}
    eager = model.generate(batch, attention_mask=mask, **options)
    monkeypatch.setattr(zoo.decode, "batched_products_backend", lambda model, rows: backend)
    aot = {"cache_implementation": "static", "compile_config": ahead_of_time_config(), **options}
    assert torch.equal(model.generate(batch, attention_mask=mask, **aot), eager)
    (key,) = zoo.decode._RUNNERS[model]
    assert key[-1] == backend


def test_batched_products_backend_is_timed_once_per_shape():
    model = _model("llama")
    assert batched_products_backend(model, 1) == "aten"  # one row: the step's matvec instead
    if not torch.backends.mkldnn.is_available():
        assert batched_products_backend(model, 4) == "aten"
        return
    chosen = batched_products_backend(model, 4)
    assert chosen in ("aten", "onednn")
    timed = dict(zoo.decode._BATCHED_BACKENDS)
    assert batched_products_backend(model, 4) == chosen and timed == zoo.decode._BATCHED_BACKENDS


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


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", ["llama", "tnl", "hybrid"])
def test_decode_step_inputs_equal_the_general_path(family, padded):
    """A decode step's inputs over a static cache, built directly, are transformers' general
    path's (with the zoo's mask cut): same keys in the same order (a compiled step takes them in
    order), same values and contiguous layouts."""
    model = _model(family)
    batch, mask, *_ = _padded_batch()
    mask = mask if padded else None
    cache = StaticCache(config=model.config, max_cache_len=20)
    positions = torch.arange(batch.shape[1])[None].expand(2, -1)
    with torch.no_grad():
        model(batch, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    grown = torch.cat([batch, batch[:, -1:]], dim=1)
    kwargs = {
        "cache": cache,
        "position_ids": torch.cat([positions, positions[:, -1:] + 1], dim=1),
        "logits_to_keep": 1,
        "use_cache": True,
    }
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    direct = model.prepare_inputs_for_generation(grown, next_sequence_length=1, **kwargs)
    general = model.prepare_inputs_for_generation(
        grown, next_sequence_length=1, **kwargs, token_type_ids=None
    )  # an extra key takes the general path
    assert list(direct) == list(general)
    flat_direct, spec_direct = torch.utils._pytree.tree_flatten(direct)
    flat_general, spec_general = torch.utils._pytree.tree_flatten(general)
    assert spec_direct == spec_general
    for a, b in zip(flat_direct, flat_general, strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b) and a.is_contiguous() and a.stride() == b.stride()
        else:
            assert a is b or a == b


def test_update_after_a_step_grows_the_mask_and_positions_as_transformers():
    model = _model("llama")
    mask, positions = torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.tensor([[0, 0, 1], [0, 1, 2]])
    for new in (1, 3):
        ours = model._update_model_kwargs_for_generation(
            {}, {"attention_mask": mask, "position_ids": positions}, num_new_tokens=new
        )
        theirs = super(type(model), model)._update_model_kwargs_for_generation(
            {}, {"attention_mask": mask, "position_ids": positions}, num_new_tokens=new
        )
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]) and ours[key].dtype == theirs[key].dtype


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


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_ahead_of_time_step_chooses_the_greedy_tokens_itself(family):
    """Greedy search with nothing that reads the logits runs a step that returns the tokens (the
    argmax taken in the compiled step); with a logits processor the step returns the logits.
    Both give the eager path's tokens."""
    model = _model(family)
    ids = torch.randint(3, 256, (2, 9))
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD_ID}
    aot = {"cache_implementation": "static", "compile_config": ahead_of_time_config(), **options}
    assert torch.equal(model.generate(ids, **aot), model.generate(ids, **options))
    penalty = {"repetition_penalty": 1.5}
    assert torch.equal(
        model.generate(ids, **aot, **penalty), model.generate(ids, **options, **penalty)
    )
    outputs = sorted(key[-2] for key in zoo.decode._RUNNERS[model])
    assert outputs == ["logits", "tokens"]


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


class _Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended = True


# Settings of `generate` the zoo's decode loop must run as transformers' loop does.
LOOP_CASES = {
    "greedy": {"do_sample": False},
    "sampling": {"do_sample": True, "top_k": 20, "temperature": 0.8},
    "processors reading the tokens": {"do_sample": False, "repetition_penalty": 1.5,
                                      "no_repeat_ngram_size": 2},
    "scores and logits": {"do_sample": True, "return_dict_in_generate": True,
                          "output_scores": True, "output_logits": True},
}  # fmt: skip


def _generate_both(model, monkeypatch, ids, **options):
    """(zoo's loop, transformers' loop) results of one `generate` call, each after the same seed,
    with a streamer recording what each sends; checks that the zoo's loop ran."""
    ran = []
    loop = zoo.decode.decode_loop
    monkeypatch.setattr(zoo.decode, "decode_loop", lambda *a: ran.append(1) or loop(*a))
    out = []
    for runs in (True, False):
        if not runs:
            monkeypatch.setattr(zoo.decode, "runs_decode_loop", lambda *a: False)
        streamer = _Recorder()
        torch.manual_seed(7)
        result = model.generate(ids, streamer=streamer, **options)
        assert streamer.ended
        out.append((result, streamer.puts))
    assert ran == [1]
    return out


@pytest.mark.parametrize("case", LOOP_CASES)
@pytest.mark.parametrize("family", ["llama", "tnl", "hybrid"])
def test_decode_loop_runs_as_transformers_loop(family, case, monkeypatch):
    """The zoo's loop over a static cache gives transformers' `_sample` results: the tokens
    (greedy, sampled from the same generator), the scores and logits, the streamed tokens."""
    model = _model(family)
    options = {"max_new_tokens": 9, "pad_token_id": PAD_ID, **LOOP_CASES[case]}
    options |= {"cache_implementation": "static", "disable_compile": True}
    ids = torch.randint(3, 256, (2, 11))
    (ours, our_puts), (theirs, their_puts) = _generate_both(model, monkeypatch, ids, **options)
    if isinstance(theirs, torch.Tensor):
        assert torch.equal(ours, theirs)
    else:
        assert torch.equal(ours.sequences, theirs.sequences)
        assert ours.sequences.shape == (2, 20)
        for key in ("scores", "logits"):
            assert len(ours[key]) == len(theirs[key]) == 9
            assert all(torch.equal(a, b) for a, b in zip(ours[key], theirs[key], strict=True))
        assert ours.cache is not None
    assert len(our_puts) == len(their_puts)
    assert all(torch.equal(a, b) for a, b in zip(our_puts, their_puts, strict=True))


def test_decode_loop_stops_rows_at_their_end_token(monkeypatch):
    """An end token finishes its row (padding after it) and, once every row has one, the call."""
    model = _model("tnl")
    ids = torch.randint(3, 256, (2, 11))
    options = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": PAD_ID}
    free = model.generate(ids, **options)[:, 11:]
    # The end token: the first token row 0 generates that row 1 does not generate before it.
    eos = next(int(t) for t in free[0, 2:] if int(t) not in free[1, :6].tolist())
    options |= {"eos_token_id": eos, "cache_implementation": "static", "disable_compile": True}
    (ours, our_puts), (theirs, their_puts) = _generate_both(model, monkeypatch, ids, **options)
    assert torch.equal(ours, theirs)
    assert (ours[0] == eos).any() and (ours[0, 11:] == PAD_ID).any()
    assert len(our_puts) == len(their_puts)


def test_decode_loop_leaves_what_it_does_not_run_to_transformers(monkeypatch):
    """Per-step hidden states are transformers' loop's to collect."""
    model = _model("tnl")
    monkeypatch.setattr(zoo.decode, "decode_loop", lambda *a: pytest.fail("zoo's loop ran"))
    out = model.generate(
        torch.randint(3, 256, (1, 5)), max_new_tokens=3, do_sample=False, pad_token_id=PAD_ID,
        cache_implementation="static", disable_compile=True, return_dict_in_generate=True,
        output_hidden_states=True,
    )  # fmt: skip
    assert len(out.hidden_states) == 3


@pytest.mark.parametrize("family", ["llama", "hybrid"])
def test_static_step_masks_equal_transformers_masks_at_every_fill(family):
    """A decode token's masks built directly are `static_masks`' (transformers' mask functions),
    with no 2-D mask (transformers drops an all-ones one), padded and unpadded rows, from the
    first decode token to the one that fills the last slot."""
    model = _model(family)
    for batch, padded in [(1, None), (2, None), (1, False), (2, True)]:
        cache = StaticCache(config=model.config, max_cache_len=20)
        ids = torch.randint(3, 256, (batch, 8))
        mask = None if padded is None else torch.ones(batch, 8, dtype=torch.long)
        if padded:
            mask[1, :3] = 0
        with torch.no_grad():
            model(ids, attention_mask=mask, cache=cache)
            for _ in range(12):  # the sequence with its next token: 9 to 20 (every slot)
                ids = torch.cat([ids, torch.randint(3, 256, (batch, 1))], dim=1)
                if mask is not None:
                    mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
                positions = torch.full((batch, 1), ids.shape[1] - 1)
                empty = torch.empty(batch, 1, 0)
                theirs = static_masks(model.config, empty, mask, cache, positions)
                ours = static_step_masks(cache, ids, mask)
                if mask is None:  # a sequence given from the cache's end on: the same masks
                    again = static_step_masks(cache, ids[:, -3:], mask)["full_attention"]
                    assert torch.equal(again, ours["full_attention"])
                assert ours.keys() == theirs.keys() and ours["linear_attention"] is None
                assert theirs["linear_attention"] is None
                a, b = ours["full_attention"], theirs["full_attention"].contiguous()
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                assert a.stride() == b.stride()
                model(ids[:, -1:], attention_mask=mask, position_ids=positions, cache=cache)


def test_step_inputs_flatten_in_pytrees_order():
    """The library's inputs, taken from a step's arguments without pytree's general walk: the
    same tensors in the same order, a dict of masks and other containers included."""
    a, b, c, d = (torch.zeros(i + 1) for i in range(4))
    kwargs = {
        "input_ids": a,
        "use_cache": True,
        "attention_mask": {"full_attention": b, "linear_attention": None},
        "other": [c, (d, 3)],
        "logits_to_keep": 1,
    }
    leaves = torch.utils._pytree.tree_leaves(kwargs)
    expected = [x for x in leaves if isinstance(x, torch.Tensor)]
    assert [id(x) for x in zoo.decode._tensor_leaves(kwargs)] == [id(x) for x in expected]


def test_recurrent_only_is_remembered_per_cache_and_its_layers():
    assert recurrent_only(StaticCache(config=_model("mamba").config, max_cache_len=8))
    assert not recurrent_only(StaticCache(config=_model("hybrid").config, max_cache_len=8))
    cache = DynamicCache()  # no config: layers come with the first update
    assert recurrent_only(cache)  # no layer yet, as all(cache.is_linear)
    cache.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 0)
    assert not recurrent_only(cache)
