"""MoE models end to end: striped hybrids, outputs and losses, load balancing, sizes."""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import zoo
from tests.test_modeling import _greedy_by_full_forward
from zoo.data import TokenBatches, pack_tokens, synthetic_documents
from zoo.layers.moe import Experts, expert_load, load_imbalance
from zoo.tokenizer import PAD_ID, byte_tokenizer

# Attention, TNL and HGRN2 sequence mixers; MoE channel mixers in three of the four layers.
STRIPED = "lightning:moe attention:moe hgrn2:swiglu lightning:moe"


def striped_config(**overrides) -> zoo.HybridConfig:
    fields = dict(
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        lightning_chunk_size=8,
        hgrn2_expand_ratio=16,
        hgrn2_chunk_size=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
    )
    return zoo.HybridConfig.from_pattern(STRIPED, **{**fields, **overrides})


def _lag2_batches(generator: torch.Generator, vocab: int = 16):
    permutation = torch.randperm(vocab, generator=generator)
    while True:
        ids = torch.randint(0, vocab, (16, 24), generator=generator)
        for t in range(2, ids.shape[1]):
            ids[:, t] = permutation[ids[:, t - 2]]
        labels = ids.clone()
        labels[:, :2] = -100
        yield ids, labels


def test_striped_moe_hybrid_trains_saves_reloads_and_generates(tmp_path):
    config = striped_config()
    assert config.mixers == ["lightning", "attention", "hgrn2", "lightning"]
    assert config.channel_mixers == ["moe", "moe", "swiglu", "moe"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    assert isinstance(model, zoo.HybridForCausalLM)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = _lag2_batches(torch.Generator().manual_seed(0))
    losses = []
    for _ in range(120):
        ids, labels = next(batches)
        out = model(ids, labels=labels, use_cache=False)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[0] > 2.5
    assert sum(losses[-10:]) / 10 < 0.75 * math.log(16), losses[-10:]

    model.eval().save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert '"channel_mixers": [\n    "moe",' in text  # per-layer lists, readable
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, zoo.HybridForCausalLM)
    reloaded.generation_config.eos_token_id = None
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = PAD_ID, 0
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
        generated = reloaded.generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD_ID
        )
        expected = _greedy_by_full_forward(reloaded, ids, 8, attention_mask=mask)
    assert torch.equal(generated, expected)


def test_moe_outputs_follow_transformers():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(striped_config()).eval()
    ids = torch.randint(0, 256, (2, 7))
    plain = model(ids)
    assert type(plain).__name__ == "MoeCausalLMOutputWithPast"
    assert plain.router_logits is None and plain.aux_loss is None and plain.loss is None
    out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == 3  # one per MoE layer
    assert all(logits.shape == (14, 4) for logits in out.router_logits)
    assert out.aux_loss is not None

    with_labels = model(ids, labels=ids)
    dense_loss = model.loss_function(logits=with_labels.logits, labels=ids, vocab_size=259)
    config = model.config
    z = zoo.layers.moe.router_z_loss(out.router_logits)
    expected = dense_loss + config.router_aux_loss_coef * out.aux_loss
    expected = expected + config.router_z_loss_coef * z
    torch.testing.assert_close(with_labels.loss, expected)


def test_padding_is_left_out_of_the_aux_loss():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(striped_config()).eval()
    ids = torch.randint(0, 256, (1, 9))
    padded = torch.cat([torch.full((1, 4), PAD_ID), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], dim=1)
    alone = model(ids, output_router_logits=True).aux_loss
    with_padding = model(padded, attention_mask=mask, output_router_logits=True).aux_loss
    torch.testing.assert_close(with_padding, alone, atol=1e-5, rtol=1e-5)


def test_dense_model_keeps_dense_outputs():
    model = AutoModelForCausalLM.from_config(zoo.LlamaConfig(hidden_size=32, num_hidden_layers=1))
    assert type(model(torch.tensor([[1, 2]]))).__name__ == "CausalLMOutputWithPast"
    assert model.config.sparsity == 0.0
    assert model.num_parameters(active=True) == model.num_parameters()


def test_active_parameters_and_sparsity():
    config = striped_config(num_experts=8, num_experts_per_tok=2, num_shared_experts=1)
    model = AutoModelForCausalLM.from_config(config)
    assert config.sparsity == pytest.approx(1 - 2 / 8)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert len(experts) == 3
    per_layer = 8 * 3 * 48 * 32  # gate_up [E, 2f, d] + down [E, d, f]
    assert all(sum(p.numel() for p in m.parameters()) == per_layer for m in experts)
    inactive = 3 * per_layer * (1 - 2 / 8)
    assert model.num_parameters() - model.num_parameters(active=True) == inactive
    # Router and shared experts are always on.
    assert model.num_parameters(active=True) > model.num_parameters() - 3 * per_layer


def test_backends_agree_inside_a_model():
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 11))
    results = {}
    for backend in ("torch", "torch_grouped_mm", "triton"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(striped_config(moe_backend=backend))
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        results[backend] = (out.logits, model.model.layers[0].channel_mixer.experts.down_proj.grad)
    for backend in ("torch_grouped_mm", "triton"):
        for a, b in zip(results["torch"], results[backend], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=backend)


def _imbalance_after_training(aux_coef: float) -> torch.Tensor:
    """Max/mean expert load per layer of a 2-layer MoE LLaMA after 150 steps on the corpus."""
    torch.manual_seed(0)
    config = zoo.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        channel_mixers=["moe"] * 2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        router_aux_loss_coef=aux_coef,
        router_z_loss_coef=0.0,
    )
    model = AutoModelForCausalLM.from_config(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = pack_tokens(synthetic_documents("train")[:400], byte_tokenizer())
    batches = TokenBatches(stream, batch_size=8, seq_len=64, seed=0)
    for _ in range(150):
        window = next(batches)
        loss = model(window, labels=window, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = model.eval()(next(batches), output_router_logits=True, use_cache=False)
    return load_imbalance(expert_load(out.router_logits, top_k=2))


def test_load_balancing_loss_balances_the_experts():
    balanced = _imbalance_after_training(aux_coef=0.1)
    free = _imbalance_after_training(aux_coef=0.0)
    assert balanced.max() < 1.5, balanced
    # Without the loss the router concentrates (max/mean 1.6 and 3.9 at this seed).
    assert balanced.mean() < 0.75 * free.mean(), (balanced, free)


def _size_in_millions(name: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)([mb])", name).groups()
    return float(value) * (1000 if unit == "b" else 1)


MOE_SIZES = (
    [
        (zoo.LlamaConfig, name, 100_280)
        for name in zoo.LlamaConfig.named_sizes
        if zoo.LlamaConfig.named_sizes[name].num_experts
    ]
    + [
        (zoo.TNLConfig, name, 100_280)
        for name in zoo.TNLConfig.named_sizes
        if zoo.TNLConfig.named_sizes[name].num_experts
    ]
    + [(zoo.HybridConfig, name, 50_280) for name in zoo.HybridConfig.named_sizes]
)


@pytest.mark.parametrize(("config_class", "name", "vocab"), MOE_SIZES)
def test_moe_size_names_say_total_and_active_parameters(config_class, name, vocab):
    total_name, active_name = re.search(r"([\d.]+[mb])-a([\d.]+[mb])$", name).groups()
    config = config_class.from_size(name, vocab_size=vocab)
    assert config.has_moe and config.num_experts == 8 and config.num_experts_per_tok == 2
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total, active = model.num_parameters() / 1e6, model.num_parameters(active=True) / 1e6
    assert abs(total - _size_in_millions(total_name)) / total < 0.03, total
    assert abs(active - _size_in_millions(active_name)) / active < 0.03, active


def test_striped_presets_follow_mad():
    config = zoo.HybridConfig.from_size("striped-hyena-moe-520m-a180m")
    assert config.mixers.count("attention") == len(config.mixers) // 4  # 25% attention
    assert set(config.channel_mixers) == {"moe"}
    assert config.layer_pattern == " ".join(["hyena:moe*3 attention:moe"] * 3)
