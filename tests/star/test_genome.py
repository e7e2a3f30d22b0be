"""STAR genomes: text and config round trips, decoding, real weight sharing, variation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from zoo.star.genome import (
    POOL,
    TOKEN_CLASSES,
    Backbone,
    Genome,
    GenomeError,
    crossover,
    decode,
    decode_fields,
    describe,
    encode,
    from_layers,
    mutate,
    problems,
    random_vector,
)

SPACE = Backbone(
    blocks=3,
    hidden_size=32,
    num_attention_heads=4,
    groups=2,
    config={
        "vocab_size": 40,
        "max_position_embeddings": 64,
        "lightning_chunk_size": 8,
        "hgrn2_chunk_size": 8,
        "mamba_chunk_size": 8,
        "hyena_filter_order": 8,
    },
)
SA, MAMBA, GCONV = 1, 5, 6  # token class ids (1-based)
SWIGLU, IDENTITY = 1, 4  # channel class ids


def _genome(vector) -> Genome:
    return Genome.from_vector(vector, SPACE)


def _vectors():
    low, high = SPACE.bounds()
    return st.tuples(*(st.integers(int(lo), int(hi)) for lo, hi in zip(low, high, strict=True)))


def _build(genome: Genome):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(decode(genome, SPACE)).eval()


def _with_layers(backbone: list[tuple[int, ...]]) -> Genome:
    return Genome(tuple(backbone), tuple((0, 0) for _ in POOL))


@given(_vectors())
@settings(max_examples=200, deadline=None)
def test_genome_text_and_config_round_trip(vector):
    genome = _genome(vector)
    assert Genome.parse(str(genome), SPACE) == genome
    config = decode(genome, SPACE)
    # config -> genome -> config builds the same architecture (same fields, same hash)
    again = encode(config, SPACE)
    assert decode_fields(again, SPACE) == decode_fields(genome, SPACE)
    assert again.digest(SPACE) == genome.digest(SPACE)
    # and the config itself survives config.json
    fields = config.to_dict()
    reloaded = AutoConfig.for_model(fields.pop("model_type"), **fields)
    assert decode_fields(encode(reloaded, SPACE), SPACE) == decode_fields(genome, SPACE)


@given(_vectors())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_genomes_build_models_that_run_and_generate(vector):
    genome = _genome(vector)
    model = _build(genome)
    model.generation_config.eos_token_id = None
    ids = torch.randint(0, 40, (2, 7))
    logits = model(ids).logits
    assert logits.shape == (2, 7, 40) and torch.isfinite(logits).all()
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    seq = ids
    for _ in range(3):  # greedy decoding with the cache = argmax of full forwards
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_featurizer_sharing_ties_the_weights_for_real(tmp_path):
    # Blocks 0 and 2: gated short convs in sharing group 1, block 2 with strategy 2 (share).
    shared = _with_layers(
        [(GCONV, 1, 1, 1, 1), (SWIGLU, 1, 1, 1, 1), (SA, 1, 1, 1, 1), (SWIGLU, 2, 1, 1, 1),
         (GCONV, 1, 2, 1, 1), (SWIGLU, 1, 2, 1, 1)]
    )  # fmt: skip
    alone = _with_layers([(*t[:2], 1, 1, 1) for t in shared.backbone])
    model, twin = _build(shared), _build(alone)
    layers = model.model.layers
    for (name, p), (_, q) in zip(
        layers[0].mixer.named_parameters(), layers[2].mixer.named_parameters(), strict=True
    ):
        assert p is q, name
    assert layers[2].channel_mixer.up_proj.weight is layers[0].channel_mixer.up_proj.weight
    saved = sum(p.numel() for p in layers[0].mixer.parameters())
    saved += sum(p.numel() for p in layers[0].channel_mixer.parameters())
    assert model.num_parameters() == twin.num_parameters() - saved
    # Both uses of the shared weight get gradient (it is one tensor, summed).
    ids = torch.randint(0, 40, (2, 9))
    model.train()(ids, labels=ids).loss.backward()
    assert layers[2].mixer.conv_weight.grad is layers[0].mixer.conv_weight.grad
    # Saved once, tied again on load.
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded_layers = loaded.model.layers
    assert loaded_layers[2].mixer.in_proj.weight is loaded_layers[0].mixer.in_proj.weight
    torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits)


def test_feature_group_sharing_reads_earlier_kv_and_drops_its_cache():
    reads = _with_layers(
        [(SA, 1, 1, 1, 1), (SWIGLU, 1, 1, 1, 1), (MAMBA, 1, 1, 1, 1), (SWIGLU, 1, 1, 1, 1),
         (SA, 2, 1, 1, 2), (SWIGLU, 1, 1, 1, 1)]
    )  # fmt: skip
    own = _with_layers([(*t[:3], 1, 1) for t in reads.backbone])
    config = decode(reads, SPACE)
    assert config.kv_source == [None, None, 0]
    model, twin = _build(reads), _build(own)
    kv_one_layer = twin.model.layers[2].mixer.state_size(1, 100)
    assert model.state_size(1, 100) == twin.state_size(1, 100) - kv_one_layer > 0
    assert not hasattr(model.model.layers[2].mixer, "k_proj")
    assert "[K/V of block 0]" in describe(reads, SPACE)[2]


@given(st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_mutation_and_crossover_keep_genomes_valid(seed):
    rng = np.random.default_rng(seed)
    a, b = random_vector(SPACE, rng), random_vector(SPACE, rng)
    for vector in (mutate(a, SPACE, rng, 0.3), *crossover(a, b, SPACE, rng, points=2)):
        genome = _genome(vector)
        assert problems(genome, SPACE) == []
        decode(genome, SPACE)
    # crossover keeps each position's five genes together: every tuple comes from a parent
    child, _ = crossover(a, b, SPACE, rng, points=2)
    for i in range(0, 5 * SPACE.positions, 5):
        assert list(child[i : i + 5]) in (list(a[i : i + 5]), list(b[i : i + 5]))


def test_mutation_changes_genes_at_about_the_rate():
    rng = np.random.default_rng(0)
    vector = random_vector(SPACE, rng)
    changed = np.mean([(mutate(vector, SPACE, rng, 0.1) != vector).mean() for _ in range(300)])
    low, high = SPACE.bounds()
    expected = 0.1 * np.mean(np.asarray(high) > np.asarray(low))  # one allowed value: no change
    assert abs(changed - expected) < 0.015, (changed, expected)


def test_genes_without_effect_do_not_change_the_hash():
    base = _with_layers([(SA, 1, 1, 1, 1), (SWIGLU, 1, 1, 1, 1)] * 3)
    # A different feature group on a position that reads nothing: the same model.
    other = _with_layers([(SA, 2, 1, 2, 1), (SWIGLU, 2, 1, 1, 1)] * 3)
    unused = Genome(base.backbone, tuple((1, 0) if c.name == "MoE" else (0, 0) for c in POOL))
    assert base.digest(SPACE) == other.digest(SPACE) == unused.digest(SPACE)
    reading = _with_layers([(SA, 1, 1, 1, 2), (SWIGLU, 1, 1, 1, 1)] * 3)
    assert reading.digest(SPACE) != base.digest(SPACE)


def test_hand_made_stacks_become_genomes():
    genome = from_layers(["mamba", "attention", "mamba"], ["swiglu", "swiglu", "none"], SPACE)
    config = decode(genome, SPACE)
    assert config.mixers == ["mamba", "attention", "mamba"]
    assert config.channel_mixers == ["swiglu", "swiglu", "none"]
    assert config.mixer_weight_source is None and config.kv_source is None
    with pytest.raises(GenomeError, match="not in the token-mixing pool"):
        from_layers(["retnet"] * 3, ["swiglu"] * 3, SPACE)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1111-11111", "5-digit tuples"),
        ("11111-11111-11111-11111-11111", "has 58 genes"),
        ("b1111-11111-11111-11111-11111-11111", r"position 0 \(class\): 11 is outside \[1, 10\]"),
        ("11111-11311-11111-11111-11111-11111", r"position 1 \(featurizer strategy\)"),
        ("11111-11111-11111-11111-11111-11111|90 00 00 00 00 00 00|00 00 00 00", "class SA"),
    ],
)
def test_bad_genomes_are_rejected_with_the_reason(text, message):
    with pytest.raises(GenomeError, match=message):
        Genome.parse(text, SPACE)


def test_configs_outside_the_pool_do_not_encode():
    config = decode(_with_layers([(SA, 1, 1, 1, 1), (SWIGLU, 1, 1, 1, 1)] * 3), SPACE)
    config.layer_overrides = [
        {**layer, "num_key_value_heads": heads}
        for layer, heads in zip(config.layer_overrides, (4, 2, 4), strict=True)
    ]
    with pytest.raises(GenomeError, match="two SA layers with different settings"):
        encode(config, SPACE)
    with pytest.raises(GenomeError, match="layers of width"):
        encode(config, Backbone(blocks=3, hidden_size=64, num_attention_heads=4))


def test_every_token_class_decodes_to_a_zoo_mixer():
    for k, cls in enumerate(TOKEN_CLASSES, start=1):
        genome = _with_layers([(k, 1, 1, 1, 1), (SWIGLU, 1, 1, 1, 1)] * 3)
        assert decode(genome, SPACE).mixers == [cls.operator] * 3


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hidden_size": 40}, r"class Rec-HGRN2.*hgrn2_expand_ratio=16 does not divide"),
        ({"num_attention_heads": 3, "hidden_size": 48}, r"class SA.*num_key_value_heads"),
    ],
)
def test_a_backbone_whose_options_do_not_build_names_the_class(fields, message):
    with pytest.raises(GenomeError, match=message):
        Backbone(**fields)
