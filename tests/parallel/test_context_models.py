"""Whole models under context parallelism: every family's tiny model, the STAR-style "shared"
stack and two striped MoE hybrids, run on 2 (and 4) gloo processes, each holding a span of the
sequence, give the loss, the logits of the span and every parameter's gradient (summed over the
ranks) of one process on the whole batch.

Tolerance (fp32): rtol 1e-4, atol 1e-5 × the reference tensor's largest magnitude (at least 1).
One spawn per world size runs every model; a model whose run raised reports its traceback, so
the others are still checked.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from transformers import AutoModelForCausalLM

import zoo
from tests.parallel.harness import run_ranks
from tests.tiny import tiny_config
from zoo import registry
from zoo.data import pack_tokens
from zoo.parallel.batch import shard_causal_batch
from zoo.parallel.context import context_parallel, shard_sequence
from zoo.tokenizer import byte_tokenizer

B, T = 2, 32

# Every sequence mixer of the striped hybrid with its tiny settings, and MoE channel mixers.
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
STRIPED = (
    "attention:moe mamba:swiglu lightning:moe hgrn2:swiglu gated_conv:moe gla:swiglu mamba2:moe "
    "gated_deltanet:swiglu"
)
CONV_ATTENTION = "gated_conv:moe attention:swiglu hyena:moe attention:moe"


def _hybrid(pattern: str, **overrides) -> zoo.HybridConfig:
    fields = dict(registry.TINY_BACKBONE)
    mixers = (
        "attention", "mamba", "lightning", "hgrn2", "gated_conv", "hyena", "gla", "mamba2",
        "gated_deltanet",
    )  # fmt: skip
    for name in mixers:
        fields.update(registry.sequence_mixer(name).tiny)
    fields.pop("num_hidden_layers")
    return zoo.HybridConfig.from_pattern(pattern, **{**fields, **_MOE, **overrides})


def _config(name: str) -> zoo.ZooConfig:
    if name == "striped":
        return _hybrid(STRIPED)
    if name == "conv_attention_moe":  # the mixers of this module: attention, short conv, Hyena
        return _hybrid(CONV_ATTENTION, num_shared_experts=1)
    if name == "llama_checkpointed":
        return tiny_config("llama")
    return tiny_config(name)


FAMILIES = [*registry.families(), "shared"]
# name: (model, rows, how the loss gets its labels, world sizes)
#   rows "random": random tokens, some labels ignored (one exactly at a span's first token);
#   rows "packed": documents packed with bos/eos, boundaries on and across the spans' edges.
#   labels "labels": the span's own labels (shifted over the ranks inside the forward);
#   "batch": zoo.parallel.batch.shard_causal_batch (shift_labels + num_items_in_batch).
CASES = {
    **{name: (name, "random", "labels", (2,)) for name in FAMILIES},
    "llama_checkpointed": ("llama_checkpointed", "random", "labels", (2,)),
    "striped": ("striped", "random", "batch", (2, 4)),
    "striped_packed": ("striped", "packed", "labels", (2, 4)),
    "conv_attention_moe": ("conv_attention_moe", "random", "batch", (2, 4)),
    "conv_attention_moe_packed": ("conv_attention_moe", "packed", "labels", (2, 4)),
}


def packed_rows() -> torch.Tensor:
    """(2, 32) rows cut from a packed stream of bos/document/eos: documents end at 7 (the last
    token of the first of 4 spans) and at 16 (the first token of the third), one runs across
    16 | 24 and another across the end of row 0 into row 1 (so across the 2-rank split too)."""
    docs = ["a" * 6, "b" * 7, "c" * 10, "d" * 20, "e" * 9, "f" * 30]
    stream = pack_tokens(docs, byte_tokenizer())
    return stream[: B * T].view(B, T)


def _batch(rows: str, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    if rows == "packed":
        ids = packed_rows()
        return ids, ids.clone()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[torch.rand(B, T, generator=g) < 0.2] = -100
    labels[0, T // 2] = -100  # row 0: the first label of the second half, the last target before
    return ids, labels


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(name)).train()
    if name == "llama_checkpointed":
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def _run(case: str, cp) -> dict:
    """Loss, logits and gradients of the case's model on this rank's span (or everything)."""
    name, rows, labels_from, _ = CASES[case]
    model = _model(name)
    ids, labels = _batch(rows, model.config.vocab_size)
    if cp is None:
        out = model(ids, labels=labels, use_cache=False)
    elif labels_from == "batch":
        out = model(**shard_causal_batch(ids, labels, cp))
    else:
        out = model(shard_sequence(ids, cp), labels=shard_sequence(labels, cp))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    result = {"loss": out.loss.detach(), "logits": out.logits.detach(), "grads": grads}
    if getattr(out, "aux_loss", None) is not None:
        result["aux_loss"] = out.aux_loss.detach()
    return result


def _all_cases(rank: int, world: int) -> dict:
    import torch.distributed as dist

    results = {}
    with context_parallel(dist.group.WORLD) as cp:
        for case, (*_, worlds) in CASES.items():
            if world in worlds:
                try:
                    results[case] = _run(case, cp)
                except Exception:
                    results[case] = traceback.format_exc()
        if world == 2:
            results["errors"] = _refusals(cp)
    return results


def _refusals(cp) -> list[str]:
    """What a model under context parallelism refuses: a cache, and padding on any rank."""
    model = _model("llama").eval()
    ids = shard_sequence(torch.randint(0, 200, (B, T)), cp)
    mask = torch.ones_like(ids)
    if cp.rank == 1:
        mask[0, 0] = 0
    messages = []
    for kwargs in ({"use_cache": True}, {"attention_mask": mask}):
        try:
            model(ids, **kwargs)
            messages.append("no error")
        except ValueError as e:
            messages.append(str(e))
    return messages


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=what)


@pytest.fixture(scope="module")
def spans():
    """world -> every rank's results: one spawn per world size, on first use."""
    runs: dict[int, list] = {}

    def of(world: int) -> list:
        if world not in runs:
            runs[world] = run_ranks(_all_cases, world, timeout=400)
        return runs[world]

    return of


def test_packed_rows_put_document_boundaries_across_the_spans():
    ids = packed_rows()
    eos, bos = byte_tokenizer().eos_token_id, byte_tokenizer().bos_token_id
    assert ids[0, 7] == eos and ids[0, 8] == bos  # a document ends with span 0 of 4
    assert ids[0, 16] == eos  # one ends on span 2's first token
    assert ids[0, 17] == bos and (ids[0, 18:28] != eos).all() and ids[0, 28] == eos  # across 24
    assert (ids[0, 29:] != eos).all() and (ids[1, :19] != bos).all()  # into row 1


@pytest.mark.parametrize(
    ("world", "case"), [(world, case) for case, (*_, worlds) in CASES.items() for world in worlds]
)
def test_model_under_context_parallelism_matches_one_process(spans, world, case):
    ranks = spans(world)
    for rank, got in enumerate(ranks):
        assert not isinstance(got[case], str), f"rank {rank} raised:\n{got[case]}"
    whole = _run(case, None)
    L = T // world
    for rank, got in enumerate(ranks):
        got = got[case]
        # Every rank reports the loss of the whole batch (one all-reduce, forward only).
        _close(got["loss"], whole["loss"], f"{case} rank {rank}: loss")
        if "aux_loss" in whole:
            _close(got["aux_loss"], whole["aux_loss"], f"{case} rank {rank}: load-balancing loss")
        span = slice(rank * L, (rank + 1) * L)
        _close(got["logits"], whole["logits"][:, span], f"{case} rank {rank}: logits")
    for name, want in whole["grads"].items():
        summed = sum(got[case]["grads"][name] for got in ranks)
        _close(summed, want, f"{case}: gradient of {name} summed over {world} ranks")
    assert all(set(got[case]["grads"]) == set(whole["grads"]) for got in ranks)


def test_a_cache_and_padding_are_refused_on_every_rank(spans):
    for got in spans(2):
        cache_error, padding_error = got["errors"]
        assert "without a cache" in cache_error
        assert "does not support padding" in padding_error
