"""MAD generators (targets, noise, determinism) and the protocol on a tiny attention model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from zoo import registry
from zoo.eval import mad
from zoo.training import supervised_loss


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_in_context_recall_scores_values_after_repeated_keys():
    for _ in range(20):
        rng = _rng(_)
        x, y = mad.in_context_recall(rng, vocab_size=16, seq_len=32, is_training=False)
        assert x.shape == y.shape == (31,)
        scored = np.flatnonzero(y != mad.IGNORE)
        assert len(scored) >= 1 and scored[-1] == 30  # the last pair is always a repeat
        for i in scored:
            assert i % 2 == 0 and x[i] < 8  # a key position
            earlier = np.flatnonzero(x[:i:2] == x[i]) * 2
            assert len(earlier) and x[earlier[0] + 1] == y[i]  # its value, fixed per sequence
    x, y = mad.in_context_recall(_rng(), vocab_size=16, seq_len=32, is_training=True)
    assert np.array_equal(y[:-1], x[1:])  # training: every next token


def test_noisy_recall_noise_fraction_and_ignored_noise_targets():
    noise_pairs, pairs = 0, 0
    for seed in range(200):
        x, y = mad.noisy_in_context_recall(_rng(seed), 32, 64, 16, 0.4, is_training=True)
        slots = np.concatenate([x, [0]]).reshape(-1, 2)[:-1]
        noisy = (slots >= 16).all(axis=1)
        noise_pairs += noisy.sum()
        pairs += len(slots)
        noise_targets = np.concatenate([x[1:], [0]]) >= 16
        assert (y[noise_targets] == mad.IGNORE).all()
    # 31 slots, one always real: the expected noisy share is 0.4 · 30/31.
    assert abs(noise_pairs / pairs - 0.4 * 30 / 31) < 0.03


def test_selective_copying_targets_are_the_tokens_in_order():
    x, y = mad.selective_copying(_rng(), vocab_size=16, seq_len=64, num_tokens_to_copy=8)
    content = x[:55][x[:55] != 14]
    assert len(content) == 8 and x[55] == 15 and (x[56:] == 14).all()
    assert (y[:56] == mad.IGNORE).all() and np.array_equal(y[56:], content)


def test_fuzzy_recall_compression_memorization_shapes():
    x, y = mad.fuzzy_in_context_recall(_rng(), 16, 64, 3, 3, is_training=False)
    assert x.shape == y.shape == (64,) and (y != mad.IGNORE).any()
    assert set(y[y != mad.IGNORE]) <= set(range(7, 15))  # value tokens only
    x, y = mad.compression(_rng(), 16, 32)
    assert x[-1] == 15 and np.array_equal(x, y)
    table = mad.memorization_map(256, seed=3)
    assert len(table) == 127 and set(table.values()) <= set(range(127, 255))
    x, y = mad.memorization(_rng(), 256, 32, table)
    assert (x[1::2] == 255).all() and all(
        table[k] == v for k, v in zip(x[::2], y[1::2], strict=True)
    )


@pytest.mark.parametrize("task", sorted(mad.TASKS))
def test_datasets_are_deterministic_by_seed(task):
    small = {"seq_len": 32} if task != "selective_copying" else {"seq_len": 48}
    a = mad.make_dataset(task, 8, 4, seed=7, **small)
    b = mad.make_dataset(task, 8, 4, seed=7, **small)
    c = mad.make_dataset(task, 8, 4, seed=8, **small)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_unknown_task_and_architecture_are_named():
    with pytest.raises(ValueError, match="unknown MAD task 'recall'"):
        mad.make_dataset("recall", 1, 1)
    with pytest.raises(ValueError, match="unknown architecture 'rnn'"):
        mad.train_task("rnn", "compression", mad.MADSettings())


def test_sweep_matches_the_paper_counts():
    counts = {task: len(settings) for task, settings in mad.DIFFICULTY_SWEEP.items()}
    assert counts == {
        "in_context_recall": 11,
        "fuzzy_in_context_recall": 11,
        "noisy_in_context_recall": 14,
        "selective_copying": 13,
        "compression": 11,
        "memorization": 6,
    }


SMALL = mad.MADSettings(
    width=64, num_train=1024, num_test=128, epochs=20, batch_size=32, lr=1e-3, weight_decay=0.0
)


def test_attention_learns_in_context_recall():
    result = mad.train_task("attention", "in_context_recall", SMALL, seq_len=32)
    assert result["accuracy"] > 2 * (1 / 8), result  # chance: one of 8 values


def test_attention_learns_selective_copying():
    result = mad.train_task(
        "attention", "selective_copying", SMALL, seq_len=48, num_tokens_to_copy=4
    )
    assert result["accuracy"] > 0.5, result  # chance: one of 14 content tokens


def test_every_architecture_runs_the_protocol():
    tiny = mad.MADSettings(width=32, num_train=32, num_test=8, epochs=1, batch_size=16)
    result = mad.run_mad(mad.architectures(), ["compression"], tiny, progress=False)
    assert set(result["mad_score"]) == set(mad.architectures()) >= set(registry.sequence_mixers())
    table = mad.mad_table(result)
    assert table.count("\n") == len(mad.architectures()) + 1


def test_moe_architectures_train_with_the_router_losses():
    """MAD's step adds the load-balancing and z-losses (as the recipe loop does): the router
    gets their gradient, so with a large aux coefficient its update differs."""
    x, y, _, _ = mad.make_dataset("in_context_recall", 16, 1, seq_len=32)
    grads = []
    for coef in (0.0, 10.0):
        torch.manual_seed(0)
        config = mad.architecture_config("striped-mamba-moe", 16, 32)
        config.router_aux_loss_coef, config.router_z_loss_coef = coef, 0.0
        model = AutoModelForCausalLM.from_config(config)
        loss = supervised_loss(model, x, y)
        (grad,) = torch.autograd.grad(loss, model.model.layers[0].channel_mixer.gate.weight)
        plain = F.cross_entropy(
            model(input_ids=x, use_cache=False).logits.flatten(0, 1), y.flatten(), ignore_index=-100
        )
        grads.append((loss - plain).item())
        grads.append(grad)
    assert grads[0] == 0.0 and grads[2] > 0.0  # the aux term is in the loss ...
    assert not torch.allclose(grads[1], grads[3])  # ... and reaches the router's gradient
