"""Tests for zoo.convert: transformers' Llama/MambaForCausalLM <-> zoo's, both ways."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import zoo
from zoo.convert import (
    HF_TO_ZOO,
    MAMBA_HF_TO_ZOO,
    MAMBA_ZOO_TO_HF,
    MIXTRAL_HF_TO_ZOO,
    MIXTRAL_ZOO_TO_HF,
    ZOO_TO_HF,
    convert_checkpoint,
    from_hf_llama,
    from_hf_mamba,
    from_hf_mixtral,
    llama_config_from_hf,
    llama_config_to_hf,
    llama_state_dict_from_hf,
    llama_state_dict_to_hf,
    mamba_config_from_hf,
    mamba_config_to_hf,
    mamba_state_dict_from_hf,
    mamba_state_dict_to_hf,
    mixtral_config_from_hf,
    mixtral_config_to_hf,
    to_hf_llama,
    to_hf_mamba,
    to_hf_mixtral,
)
from zoo.tokenizer import byte_tokenizer

ATOL = 1e-5
SIZES = dict(
    vocab_size=300,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
)


def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """RMSNorm gains start at 1; make them differ so a swapped norm would show in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn(param.shape, generator=gen))


def hf_llama(tie: bool, seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        **SIZES,
        tie_word_embeddings=tie,
        initializer_range=0.1,  # logits of order 1, so that atol 1e-5 is a tight check
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        pad_token_id=0,
        **overrides,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    _perturb_norms(model, seed)
    return model


def zoo_llama(tie: bool = False, seed: int = 1) -> zoo.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = zoo.LlamaConfig(**SIZES, tie_word_embeddings=tie, initializer_range=0.1)
    model = zoo.LlamaForCausalLM(config).eval()
    _perturb_norms(model, seed)
    return model


def random_ids(seed: int = 2, batch: int = 2, length: int = 13) -> torch.Tensor:
    return torch.randint(
        0, SIZES["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= ATOL, f"max abs logit difference {diff:.3g} > {ATOL}"


# ------------------------------------------------------------------------------ transformers -> zoo


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_hf_to_zoo_same_logits(tie):
    hf = hf_llama(tie)
    model = from_hf_llama(hf)
    assert isinstance(model, zoo.LlamaForCausalLM)
    assert model.config.tie_word_embeddings is tie
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    assert model.config.rotary_base == 5000.0
    ids = random_ids()
    assert_close(logits(model, ids), logits(hf, ids))


def test_hf_to_zoo_left_padded():
    hf = hf_llama(tie=False)
    model = from_hf_llama(hf)
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    # transformers' forward numbers positions 0..T-1 whatever the mask (generate passes its own);
    # zoo derives padding-aware positions from the mask, so hand transformers the same ones.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = logits(hf, ids, attention_mask=mask, position_ids=positions)
    got = logits(model, ids, attention_mask=mask)
    keep = mask.bool()
    assert_close(got[keep], expected[keep])


def test_hf_to_zoo_greedy_generate():
    hf = hf_llama(tie=True)
    model = from_hf_llama(hf)
    ids = random_ids(seed=3, length=7)
    ids[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = dict(
        attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
    )
    with torch.no_grad():
        expected = hf.generate(ids, **kwargs)
        got = model.generate(ids, **kwargs)
    assert expected.shape == (2, 15)
    assert torch.equal(got, expected)


def test_config_from_hf_maps_fields():
    hf_config = transformers.LlamaConfig(
        **SIZES,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        initializer_range=0.03,
        bos_token_id=5,
        eos_token_id=[6, 7],
        pad_token_id=None,
    )
    config = llama_config_from_hf(hf_config)
    assert isinstance(config, zoo.LlamaConfig)
    for field in (*SIZES, "rms_norm_eps", "max_position_embeddings", "initializer_range"):
        assert getattr(config, field) == getattr(hf_config, field), field
    assert config.rotary_base == 500000.0
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (5, [6, 7], None)
    assert config.mixers == ["attention"] * 2 and config.channel_mixers == ["swiglu"] * 2
    back = llama_config_to_hf(config)
    for field in (*SIZES, "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(back, field) == getattr(hf_config, field), field
    assert back.rope_parameters == hf_config.rope_parameters
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (5, [6, 7], None)


def test_state_dict_renames_and_drops_rotary_buffers():
    hf = hf_llama(tie=False)
    state_dict = dict(hf.state_dict())
    state_dict["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    state_dict["model.rotary_emb.inv_freq"] = torch.ones(8)
    renamed = llama_state_dict_from_hf(state_dict)
    assert set(renamed) == set(zoo_llama().state_dict())
    assert (
        renamed["model.layers.1.mixer_norm.weight"]
        is state_dict["model.layers.1.input_layernorm.weight"]
    )
    assert (
        renamed["model.layers.0.channel_mixer.down_proj.weight"]
        is state_dict["model.layers.0.mlp.down_proj.weight"]
    )
    assert set(llama_state_dict_to_hf(renamed)) == set(hf.state_dict())


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.mixer.q_proj.weight",
        "extra.weight",
    ],
)
def test_state_dict_unknown_key_refused(key):
    state_dict = {"model.embed_tokens.weight": torch.zeros(1), key: torch.zeros(1)}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        llama_state_dict_from_hf(state_dict)


# ------------------------------------------------------------------------------ zoo -> transformers


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_zoo_to_hf_same_logits(tie):
    model = zoo_llama(tie)
    hf = to_hf_llama(model)
    assert isinstance(hf, transformers.LlamaForCausalLM)
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) is tie
    ids = random_ids()
    assert_close(logits(hf, ids), logits(model, ids))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_zoo_hf_zoo_round_trip_is_bit_identical(tie):
    model = zoo_llama(tie)
    back = from_hf_llama(to_hf_llama(model))
    before, after = model.state_dict(), back.state_dict()
    assert set(before) == set(after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype, key
        assert torch.equal(after[key], tensor), key
    assert back.config.to_diff_dict() == model.config.to_diff_dict()


def test_conversion_keeps_dtype():
    model = zoo_llama().to(torch.bfloat16)
    hf = to_hf_llama(model)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in from_hf_llama(hf).parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_convert_checkpoint_both_ways(tmp_path, tie):
    hf = hf_llama(tie, seed=4)
    src, zoo_dir, hf_dir = tmp_path / "hf", tmp_path / "zoo", tmp_path / "hf_again"
    hf.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    ids = random_ids(seed=5)
    expected = logits(hf, ids)

    assert convert_checkpoint(src, zoo_dir) == HF_TO_ZOO
    assert json.loads((zoo_dir / "config.json").read_text())["model_type"] == "zoo_llama"
    assert list(zoo_dir.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(zoo_dir)
    assert isinstance(model, zoo.LlamaForCausalLM)
    assert_close(logits(model.eval(), ids), expected)
    tokenizer = AutoTokenizer.from_pretrained(zoo_dir)
    assert tokenizer("hi")["input_ids"] == byte_tokenizer()("hi")["input_ids"]

    assert convert_checkpoint(str(zoo_dir), str(hf_dir)) == ZOO_TO_HF
    again = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(again) is transformers.LlamaForCausalLM
    assert_close(logits(again.eval(), ids), expected)
    assert (hf_dir / "tokenizer.json").is_file()


def test_convert_checkpoint_without_tokenizer(tmp_path):
    model = zoo_llama()
    model.save_pretrained(tmp_path / "zoo")
    assert convert_checkpoint(tmp_path / "zoo", tmp_path / "hf") == ZOO_TO_HF
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = random_ids()
    assert_close(logits(hf.eval(), ids), logits(model, ids))


# ------------------------------------------------------------------------------------------ errors


def test_unknown_model_type_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2") as info:
        convert_checkpoint(tmp_path, tmp_path / "out")
    message = str(info.value)
    assert str(tmp_path / "config.json") in message
    assert "'llama'" in message and "'zoo_llama'" in message and "'mixtral'" in message


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json") as info:
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "out")
    assert str(tmp_path / "nowhere" / "config.json") in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(hidden_act="gelu"), "hidden_act"),
        (
            dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
            r"rope_parameters\['rope_type'\]='dynamic'",
        ),
        (
            dict(
                rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                partial_rotary_factor=0.5,
            ),
            "partial_rotary_factor",
        ),
    ],
)
def test_unrepresentable_hf_config_refused(overrides, field):
    config = transformers.LlamaConfig(**{**SIZES, **overrides})
    with pytest.raises(ValueError, match=field):
        llama_config_from_hf(config)


def test_dynamic_rope_model_refused():
    config = transformers.LlamaConfig(
        **SIZES, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    )
    with pytest.raises(ValueError, match="rope_type"):
        from_hf_llama(transformers.LlamaForCausalLM(config))


def test_tnl_config_refused():
    config = zoo.TNLConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"mixers\[0\]='lightning'"):
        llama_config_to_hf(config)


def test_hybrid_and_srmsnorm_refused():
    hybrid = zoo.LlamaConfig(**SIZES, channel_mixers=["swiglu", "glu"])
    with pytest.raises(ValueError, match=r"channel_mixers\[1\]='glu'"):
        llama_config_to_hf(hybrid)
    with pytest.raises(ValueError, match="norm_type='srmsnorm'"):
        llama_config_to_hf(zoo.LlamaConfig(**SIZES, norm_type="srmsnorm"))


# ========================================================================================= Mamba

MAMBA_SIZES = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, state_size=8)


def _perturb_mamba(model: torch.nn.Module, seed: int) -> None:
    """Norm gains, D and A_log start as constants; make them differ so a swap would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D", ".A_log")):
                param.add_(0.2 * torch.randn(param.shape, generator=gen))


def hf_mamba(tie: bool = True, seed: int = 0, **overrides) -> transformers.MambaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.MambaConfig(
        **{**MAMBA_SIZES, "use_bias": False, **overrides},
        tie_word_embeddings=tie,
        initializer_range=0.1,  # logits of order 1, so that atol 1e-5 is a tight check
        pad_token_id=0,
    )
    model = transformers.MambaForCausalLM(config).eval()
    _perturb_mamba(model, seed)
    return model


def zoo_mamba(tie: bool = True, seed: int = 1, **overrides) -> zoo.MambaForCausalLM:
    torch.manual_seed(seed)
    config = zoo.MambaConfig(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        mamba_d_state=8,
        mamba_chunk_size=8,
        tie_word_embeddings=tie,
        initializer_range=0.1,
        **overrides,
    )
    model = zoo.MambaForCausalLM(config).eval()
    _perturb_mamba(model, seed)
    return model


@pytest.mark.parametrize(
    ("tie", "use_bias"),
    [(True, False), (False, False), (True, True)],
    ids=["tied", "untied", "bias"],
)
def test_mamba_hf_to_zoo_same_logits(tie, use_bias):
    hf = hf_mamba(tie, use_bias=use_bias)
    model = from_hf_mamba(hf)
    assert isinstance(model, zoo.MambaForCausalLM)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    assert model.config.mamba_proj_bias is use_bias
    ids = random_ids(length=37)
    assert_close(logits(model, ids), logits(hf, ids))


def test_mamba_hf_to_zoo_left_padded():
    hf = hf_mamba()
    model = from_hf_mamba(hf)
    ids = random_ids(length=21)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    keep = mask.bool()
    assert_close(
        logits(model, ids, attention_mask=mask)[keep], logits(hf, ids, attention_mask=mask)[keep]
    )


def test_mamba_hf_to_zoo_greedy_generate():
    hf = hf_mamba(seed=3)
    model = from_hf_mamba(hf)
    ids = random_ids(seed=3, length=11)
    ids[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = dict(
        attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
    )
    with torch.no_grad():
        expected = hf.generate(ids, **kwargs)
        got = model.generate(ids, **kwargs)
    assert expected.shape == (2, 19)
    assert torch.equal(got, expected)


def test_mamba_cached_decode_matches_hf():
    hf = hf_mamba(seed=4)
    model = from_hf_mamba(hf)
    ids = random_ids(seed=4, length=20)
    with torch.no_grad():
        ours = model(ids[:, :13], use_cache=True)
        theirs = hf(ids[:, :13], use_cache=True)
        outs, refs = [ours.logits], [theirs.logits]
        for t in range(13, 20):
            ours = model(ids[:, t : t + 1], cache=ours.cache, use_cache=True)
            theirs = hf(ids[:, t : t + 1], cache=theirs.cache, use_cache=True)
            outs.append(ours.logits)
            refs.append(theirs.logits)
    assert_close(torch.cat(outs, dim=1), torch.cat(refs, dim=1))


def test_mamba_config_from_hf_maps_fields():
    hf_config = transformers.MambaConfig(
        **MAMBA_SIZES,
        conv_kernel=3,
        expand=3,
        time_step_rank=5,
        time_step_min=0.002,
        time_step_max=0.2,
        time_step_floor=3e-4,
        layer_norm_epsilon=1e-6,
        use_bias=True,
        use_conv_bias=False,
        tie_word_embeddings=False,
        initializer_range=0.05,
        bos_token_id=5,
        eos_token_id=[6, 7],
        pad_token_id=None,
    )
    config = mamba_config_from_hf(hf_config)
    assert isinstance(config, zoo.MambaConfig)
    expected = dict(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        mamba_d_state=8,
        mamba_d_conv=3,
        mamba_expand=3,
        mamba_dt_rank=5,
        mamba_dt_min=0.002,
        mamba_dt_max=0.2,
        mamba_dt_init_floor=3e-4,
        rms_norm_eps=1e-6,
        mamba_proj_bias=True,
        mamba_conv_bias=False,
        tie_word_embeddings=False,
        initializer_range=0.05,
    )
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (5, [6, 7], None)
    assert config.mixers == ["mamba"] * 2 and config.channel_mixers == ["none"] * 2
    back = mamba_config_to_hf(config)
    for field in (
        *MAMBA_SIZES,
        "conv_kernel",
        "expand",
        "time_step_rank",
        "time_step_min",
        "time_step_max",
        "time_step_floor",
        "layer_norm_epsilon",
        "use_bias",
        "use_conv_bias",
        "tie_word_embeddings",
        "initializer_range",
        "intermediate_size",
    ):
        assert getattr(back, field) == getattr(hf_config, field), field
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (5, [6, 7], None)


def test_mamba_state_dict_renames():
    hf = hf_mamba(tie=False)
    state_dict = dict(hf.state_dict())
    renamed = mamba_state_dict_from_hf(state_dict)
    assert set(renamed) == set(zoo_mamba(tie=False).state_dict())
    assert (
        renamed["model.layers.1.mixer_norm.weight"] is state_dict["backbone.layers.1.norm.weight"]
    )
    assert renamed["model.layers.0.mixer.A_log"] is state_dict["backbone.layers.0.mixer.A_log"]
    assert renamed["model.norm.weight"] is state_dict["backbone.norm_f.weight"]
    assert set(mamba_state_dict_to_hf(renamed)) == set(state_dict)
    # Released mamba_ssm checkpoints name the embedding "backbone.embedding".
    legacy = {"backbone.embedding.weight": state_dict["backbone.embeddings.weight"]}
    assert mamba_state_dict_from_hf(legacy) == {
        "model.embed_tokens.weight": legacy["backbone.embedding.weight"]
    }


@pytest.mark.parametrize(
    "key",
    [
        "backbone.layers.0.mixer.q_proj.weight",
        "backbone.layers.0.mlp.weight",
        "model.layers.0.mixer.A_log",
        "extra.weight",
    ],
)
def test_mamba_state_dict_unknown_key_refused(key):
    state_dict = {"backbone.embeddings.weight": torch.zeros(1), key: torch.zeros(1)}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        mamba_state_dict_from_hf(state_dict)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_mamba_zoo_to_hf_same_logits(tie):
    model = zoo_mamba(tie)
    hf = to_hf_mamba(model)
    assert isinstance(hf, transformers.MambaForCausalLM)
    assert (hf.lm_head.weight is hf.backbone.embeddings.weight) is tie
    ids = random_ids(length=37)
    assert_close(logits(hf, ids), logits(model, ids))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_mamba_zoo_hf_zoo_round_trip_is_bit_identical(tie):
    model = zoo_mamba(tie, mamba_proj_bias=True)
    back = from_hf_mamba(to_hf_mamba(model))
    before, after = model.state_dict(), back.state_dict()
    assert set(before) == set(after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype, key
        assert torch.equal(after[key], tensor), key


def test_mamba_conversion_keeps_dtype():
    model = zoo_mamba().to(torch.bfloat16)
    hf = to_hf_mamba(model)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in from_hf_mamba(hf).parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_mamba_convert_checkpoint_both_ways(tmp_path, tie):
    hf = hf_mamba(tie, seed=5)
    src, zoo_dir, hf_dir = tmp_path / "hf", tmp_path / "zoo", tmp_path / "hf_again"
    hf.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    ids = random_ids(seed=5)
    expected = logits(hf, ids)

    assert convert_checkpoint(src, zoo_dir) == MAMBA_HF_TO_ZOO
    assert json.loads((zoo_dir / "config.json").read_text())["model_type"] == "zoo_mamba"
    model = AutoModelForCausalLM.from_pretrained(zoo_dir)
    assert isinstance(model, zoo.MambaForCausalLM)
    assert_close(logits(model.eval(), ids), expected)
    assert (zoo_dir / "tokenizer.json").is_file()

    assert convert_checkpoint(str(zoo_dir), str(hf_dir)) == MAMBA_ZOO_TO_HF
    again = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(again) is transformers.MambaForCausalLM
    assert_close(logits(again.eval(), ids), expected)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [(dict(hidden_act="gelu"), "hidden_act"), (dict(model_type="falcon_mamba"), "model_type")],
)
def test_mamba_unrepresentable_hf_config_refused(overrides, field):
    config = transformers.MambaConfig(**MAMBA_SIZES)
    for name, value in overrides.items():
        setattr(config, name, value)
    with pytest.raises(ValueError, match=field):
        mamba_config_from_hf(config)


def test_mamba_init_only_fields_dropped_with_warning(caplog):
    config = transformers.MambaConfig(**MAMBA_SIZES, time_step_scale=2.0, use_mambapy=True)
    with caplog.at_level("WARNING", logger="zoo.convert"):
        converted = mamba_config_from_hf(config)
    assert "time_step_scale=2.0" in caplog.text
    assert "use_mambapy" not in caplog.text  # an implementation switch, dropped silently
    assert converted.mamba_d_state == 8


def test_non_mamba_zoo_configs_refused():
    with pytest.raises(ValueError, match=r"mixers\[0\]='lightning'"):
        mamba_config_to_hf(zoo.TNLConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2))
    hybrid = zoo.MambaConfig(**SIZES, channel_mixers=["none", "glu"])
    with pytest.raises(ValueError, match=r"channel_mixers\[1\]='glu'"):
        mamba_config_to_hf(hybrid)
    with pytest.raises(ValueError, match="norm_type='srmsnorm'"):
        mamba_config_to_hf(zoo.MambaConfig(**SIZES, norm_type="srmsnorm"))


# ---------------------------------------------------------------------------------------- Mixtral

MIXTRAL_SIZES = dict(SIZES, num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)


def hf_mixtral(seed: int = 0, **overrides) -> transformers.MixtralForCausalLM:
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        **MIXTRAL_SIZES,
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        pad_token_id=0,
        **overrides,
    )
    model = transformers.MixtralForCausalLM(config).eval()
    _perturb_norms(model, seed)
    return model


def test_mixtral_to_zoo_same_logits_and_router_logits():
    hf = hf_mixtral()
    model = from_hf_mixtral(hf)
    assert isinstance(model, zoo.LlamaForCausalLM)
    assert model.config.channel_mixers == ["moe", "moe"] and model.config.num_experts == 4
    assert model.config.moe_intermediate_size == 48 and model.config.router_z_loss_coef == 0
    ids = random_ids()
    with torch.no_grad():
        expected = hf(ids, output_router_logits=True)
        got = model(ids, output_router_logits=True)
    assert_close(got.logits, expected.logits)
    assert len(got.router_logits) == len(expected.router_logits) == 2
    for ours, theirs in zip(got.router_logits, expected.router_logits, strict=True):
        assert_close(ours, theirs)


def test_mixtral_to_zoo_greedy_generate():
    hf = hf_mixtral(seed=3)
    model = from_hf_mixtral(hf)
    ids = random_ids(seed=4, length=7)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kwargs), hf.generate(ids, **kwargs))


def test_zoo_moe_llama_to_mixtral_and_back():
    torch.manual_seed(1)
    config = zoo.LlamaConfig(
        **SIZES,
        channel_mixers=["moe"] * 2,
        num_experts=4,
        moe_intermediate_size=40,
        router_z_loss_coef=0.0,
        initializer_range=0.1,
    )
    model = zoo.LlamaForCausalLM(config).eval()
    _perturb_norms(model, 1)
    hf = to_hf_mixtral(model)
    assert isinstance(hf, transformers.MixtralForCausalLM)
    assert hf.config.num_local_experts == 4 and hf.config.intermediate_size == 40
    ids = random_ids()
    with torch.no_grad():
        ours, theirs = model(ids, output_router_logits=True), hf(ids, output_router_logits=True)
    assert_close(theirs.logits, ours.logits)
    for a, b in zip(ours.router_logits, theirs.router_logits, strict=True):
        assert_close(a, b)
    back = from_hf_mixtral(hf)
    for key, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_mixtral_convert_checkpoint_both_ways(tmp_path):
    hf = hf_mixtral(seed=5)
    src, zoo_dir, hf_dir = tmp_path / "hf", tmp_path / "zoo", tmp_path / "hf_again"
    hf.save_pretrained(src)
    ids = random_ids(seed=6)
    expected = logits(hf, ids)
    assert convert_checkpoint(src, zoo_dir) == MIXTRAL_HF_TO_ZOO
    model = AutoModelForCausalLM.from_pretrained(zoo_dir)
    assert isinstance(model, zoo.LlamaForCausalLM) and model.config.has_moe
    assert_close(logits(model.eval(), ids), expected)
    assert convert_checkpoint(zoo_dir, hf_dir) == MIXTRAL_ZOO_TO_HF
    again = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(again) is transformers.MixtralForCausalLM
    assert_close(logits(again.eval(), ids), expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(router_scoring_func="sigmoid"), "router_scoring_func='sigmoid'"),
        (dict(norm_topk_prob=False), "norm_topk_prob=False"),
        (dict(num_shared_experts=1), "num_shared_experts=1"),
        (dict(moe_capacity_factor=1.25), "moe_capacity_factor=1.25"),
        (dict(channel_mixers=["moe", "swiglu"]), r"channel_mixers\[1\]='swiglu'"),
    ],
)
def test_zoo_moe_that_mixtral_cannot_hold_refused(overrides, message):
    fields = {**SIZES, "channel_mixers": ["moe"] * 2, "num_experts": 4, **overrides}
    with pytest.raises(ValueError, match=message):
        mixtral_config_to_hf(zoo.LlamaConfig(**fields))


def test_mixtral_sliding_window_refused():
    config = transformers.MixtralConfig(**MIXTRAL_SIZES, sliding_window=16)
    with pytest.raises(ValueError, match="sliding_window=16"):
        mixtral_config_from_hf(config)
