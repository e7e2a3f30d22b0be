"""Context parallelism of the recurrent mixers (`zoo.parallel.scan`) on 2 and 4 gloo processes
against one process on the whole sequence.

Every rank builds the same layer (same seed) or the same op inputs, takes its span of a
(B, T, ...) input and runs inside `context_parallel`; the parent runs the plain layer or op on
the whole sequence. Compared: the outputs (concatenated over ranks), the gradients of every
per-token input (concatenated) and of every parameter and shared input (summed over ranks),
for the loss Σ(out · w) with a fixed random w. Layers: TNL's lightning attention (layer 0,
where λ^L is far from 0 on one head and near 1 on the other), cosFormer2 (global LRPE
positions), HGRN2 (with the model's lower bounds Γ, gates near 1 on some channels: Γ's gradient
too) and Mamba (conv halo and the scan). Ops: lightning, gated linear attention and the
selective scan, with decays that matter, on batches and on packed rows whose documents cross,
start at and stay within the spans' borders. Tolerance: fp32, 1e-5 relative (elementwise rtol
1e-5, atol 1e-5 × the expected tensor's largest entry). Each world size is one spawn that runs
every case (a module-scoped fixture); the tests read its results.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from tests.parallel.harness import run_ranks
from tests.tiny import tiny_config
from zoo.cache import new_cache
from zoo.kernels.gla import gla
from zoo.kernels.lightning import lightning
from zoo.kernels.selective_scan import selective_scan
from zoo.layers import build_sequence_mixer
from zoo.layers.context import MixerContext
from zoo.parallel.context import context_parallel, shard_sequence
from zoo.parallel.scan import (
    gla_cp,
    lightning_cp,
    recurrent_group,
    selective_scan_cp,
    span_documents,
)

T, BATCH, HEADS, HEAD_DIM = 32, 2, 2, 8
WIDTH = HEADS * HEAD_DIM
CHUNK = 5  # no divisor of any span: ragged chunks on every rank
# Packed rows over T = 32: with 2 ranks (spans of 16) and 4 (spans of 8), documents cross
# borders, start exactly at one (a zero start state), are empty, fill a whole span (which then
# passes the state through), and start inside a span whose next span continues them (4 ranks,
# "inside": the span passes on only its own last document's state, nothing from before it).
PACKINGS = {"cross": [0, 3, 19, 24, 24, 30, 32], "aligned": [0, 16, 20, 32], "inside": [0, 12, 32]}

# mixer name: (family, layer index[, settings])
LAYERS = {"lightning": ("tnl", 0), "cosformer2": ("cosformer2", 1), "hgrn2": ("hgrn2", 2),
          "mamba": ("mamba", 1),
          # the released TransNormerLLM's first layer: learned LRPE, linear output gate
          "lightning_released": ("tnl", 0, {"lightning_lrpe": True,
                                            "output_gate": "linear"})}  # fmt: skip


# --- layers --------------------------------------------------------------------------------------


def _layer(name: str):
    family, layer_idx, *settings = LAYERS[name]
    config = tiny_config(
        family, hidden_size=WIDTH, num_attention_heads=HEADS, hgrn2_expand_ratio=HEAD_DIM,
        **(settings[0] if settings else {}),
    )  # fmt: skip
    torch.manual_seed(0)
    layer = build_sequence_mixer(config, layer_idx)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, T, WIDTH, generator=generator)
    w = torch.randn(BATCH, T, WIDTH, generator=generator)
    extra = {}
    if name == "hgrn2":
        # Γ with a very low first row on a quarter of the channels: β_2 ≈ 0.98, f_t ∈ [0.98, 1).
        gamma = torch.randn(config.num_hidden_layers, WIDTH, generator=generator)
        gamma[0, : WIDTH // 4] = -3.0
        extra["hgrn2_lower_bounds"] = gamma
    return layer, x, w, extra, config


def _layer_run(name: str, cp, start: int = 0) -> dict:
    """Forward and backward of the layer on the whole sequence (cp None; or only its tokens
    from `start` on) or on this rank's span."""
    layer, x, w, extra, _ = _layer(name)
    positions = torch.arange(T).expand(BATCH, T)
    if cp is not None:
        x, w, positions = (shard_sequence(t, cp) for t in (x, w, positions))
    x, w, positions = x[:, start:], w[:, start:], positions[:, start:]
    x = x.clone().requires_grad_()
    parameters = {k: v.clone().requires_grad_() for k, v in extra.items()}
    context = MixerContext(position_ids=positions, parameters=parameters)
    out = layer(x, context)
    (out * w).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    grads.update({n: p.grad for n, p in parameters.items()})
    return {"out": out.detach(), "x": x.grad, "grads": grads}


# --- ops -----------------------------------------------------------------------------------------

OPS = ["lightning", "lightning_packed", "no_decay", "gla", "gla_packed", "selective_scan",
       "selective_scan_packed"]  # fmt: skip


def _op_inputs(name: str, packing: str | None):
    """(per-token inputs (B, T, ...), shared inputs, w) of an op case."""
    g = torch.Generator().manual_seed(2)
    batch = 1 if packing else BATCH
    if name.startswith("selective_scan"):
        d_inner, n_state = 6, 4
        per_token = {
            "u": torch.randn(batch, T, d_inner, generator=g),
            "delta": F.softplus(torch.randn(batch, T, d_inner, generator=g) - 2.0),
            "B": torch.randn(batch, T, n_state, generator=g),
            "C": torch.randn(batch, T, n_state, generator=g),
            "z": torch.randn(batch, T, d_inner, generator=g),
        }
        shared = {
            "A": -torch.rand(d_inner, n_state, generator=g) * 0.5,
            "D": torch.randn(d_inner, generator=g),
        }
        return per_token, shared, torch.randn(batch, T, d_inner, generator=g)
    shape = (batch, T, HEADS, HEAD_DIM)
    per_token = {
        "q": torch.randn(shape, generator=g),
        "k": torch.randn(shape, generator=g),
        "v": torch.randn(shape, generator=g),
    }
    shared = {}
    if name.startswith("gla"):
        # Log gates near 0 (decay ≈ 1) on half the key channels, strong decay on the others.
        logits = torch.randn(shape, generator=g) + torch.tensor([5.0, -1.0]).repeat(HEAD_DIM // 2)
        per_token["g"] = F.logsigmoid(logits)
    elif name.startswith("lightning"):
        shared["log_decay"] = torch.tensor([-0.02, -0.25])  # λ^16: 0.73 and 0.018
    return per_token, shared, torch.randn(batch, T, HEADS, HEAD_DIM, generator=g)


def _op_forward(name: str, t: dict, cu: torch.Tensor | None, cp, backend: str) -> torch.Tensor:
    """The op on the whole sequence (cp None) or its context-parallel form on this span."""
    # The Triton kernels round the chunk to a power of two in [16, 64].
    chunk = CHUNK if backend == "torch" else 16
    kw = {"chunk_size": chunk, "backend": backend, "cu_seqlens": cu}
    if name.startswith("lightning") or name == "no_decay":
        ld = t.get("log_decay")
        if cp is None:
            return lightning(t["q"], t["k"], t["v"], ld, **kw)[0]
        return lightning_cp(t["q"], t["k"], t["v"], ld, cp, **kw)
    if name.startswith("gla"):
        if cp is None:
            return gla(t["q"], t["k"], t["v"], t["g"], **kw)[0]
        return gla_cp(t["q"], t["k"], t["v"], t["g"], cp, **kw)
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"])
    if cp is None:
        return selective_scan(*args, z=t["z"], **kw)[0]
    return selective_scan_cp(*args, cp, z=t["z"], **kw)


def _op_run(name: str, packing: str | None, cp, backend: str = "torch") -> dict:
    per_token, shared, w = _op_inputs(name, packing)
    if cp is not None:
        per_token = {k: shard_sequence(v, cp) for k, v in per_token.items()}
        w = shard_sequence(w, cp)
    tensors = {k: v.clone().requires_grad_() for k, v in {**per_token, **shared}.items()}
    cu = torch.tensor(PACKINGS[packing], dtype=torch.int32) if packing else None
    out = _op_forward(name, tensors, cu, cp, backend)
    (out * w).sum().backward()
    return {"out": out.detach(), "grads": {k: v.grad for k, v in tensors.items()}}


def _op_cases() -> list[tuple[str, str | None]]:
    return [
        (name, packing)
        for name in OPS
        for packing in (PACKINGS if name.endswith("packed") else [None])
    ]


# --- the spawned ranks and the comparisons -------------------------------------------------------


def _every_case(rank, world):
    import torch.distributed as dist

    results = {}
    with context_parallel(dist.group.WORLD) as cp:
        for name in LAYERS:
            results[name] = _layer_run(name, cp)
        for name, packing in _op_cases():
            results[f"{name}/{packing}"] = _op_run(name, packing, cp)
    return results


def _triton_cases(rank, world):
    """The op cases on the Triton kernels (the CPU interpreter: tests/conftest.py sets
    TRITON_INTERPRET=1, which the spawned ranks inherit)."""
    import torch.distributed as dist

    with context_parallel(dist.group.WORLD) as cp:
        return {f"{n}/{p}": _op_run(n, p, cp, "triton") for n, p in _op_cases()}


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_every_case, 2)


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(_every_case, 4)


@pytest.fixture(params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request):
    return request.getfixturevalue({2: "two_ranks", 4: "four_ranks"}[request.param])


def _close(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    atol = 1e-5 * float(expected.abs().max().clamp(min=1e-30))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


def _compare(results: list[dict], whole: dict, per_token: set[str], label: str) -> None:
    _close(torch.cat([r["out"] for r in results], dim=1), whole["out"], f"{label} output")
    for key, expected in whole["grads"].items():
        grads = [r["grads"][key] for r in results]
        got = torch.cat(grads, dim=1) if key in per_token else torch.stack(grads).sum(0)
        _close(got, expected, f"{label} d{key}")


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_one_process(ranks, name):
    whole = _layer_run(name, None)
    results = [r[name] for r in ranks]
    _close(torch.cat([r["x"] for r in results], dim=1), whole["x"], f"{name} dx")
    _compare(results, whole, set(), name)
    # What earlier spans carry in matters: the last span alone gives other outputs.
    span = results[-1]["out"].shape[1]
    alone = _layer_run(name, None, start=T - span)["out"]
    assert (alone - whole["out"][:, -span:]).abs().max() > 1e-3 * whole["out"].abs().max()


@pytest.mark.parametrize(("name", "packing"), _op_cases())
def test_op_matches_one_process(ranks, name, packing):
    whole = _op_run(name, packing, None)
    per_token, _, _ = _op_inputs(name, packing)
    _compare([r[f"{name}/{packing}"] for r in ranks], whole, set(per_token), name)


@pytest.mark.slow
def test_ops_on_the_triton_kernels_match_one_process():
    """The same on the Triton kernels (interpreted here; CUDA in a GPU run): their final-state
    gradients and packed bounds under context parallelism. About 40 s on 2 CPU cores."""
    results = run_ranks(_triton_cases, 2, timeout=600)
    for name, packing in _op_cases():
        whole = _op_run(name, packing, None, "triton")
        per_token, _, _ = _op_inputs(name, packing)
        label = f"{name}/{packing}"
        _compare([r[label] for r in results], whole, set(per_token), f"triton {label}")


# --- host-side pieces -----------------------------------------------------------------------------


def test_span_documents():
    def docs(rank, size, local_len, bounds):
        cp = types.SimpleNamespace(rank=rank, size=size)
        d = span_documents(torch.tensor(bounds), cp, local_len)
        return d.cu_seqlens.tolist(), d.continues, d.passes_through, d.first_len

    cross = PACKINGS["cross"]
    assert docs(0, 4, 8, cross) == ([0, 3, 8], False, False, 3)
    assert docs(1, 4, 8, cross) == ([0, 8], True, True, 8)  # inside one document: passes through
    assert docs(2, 4, 8, cross) == ([0, 3, 8], True, False, 3)
    assert docs(3, 4, 8, cross) == ([0, 6, 8], False, False, 6)  # starts a document (and an empty)
    assert docs(1, 2, 16, cross) == ([0, 3, 8, 14, 16], True, False, 3)
    with pytest.raises(ValueError, match="from 0 to the whole row's 32 tokens"):
        docs(0, 2, 16, [0, 30])


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_cache_under_context_parallelism_is_refused(name):
    layer, x, _, extra, config = _layer(name)
    context = MixerContext(position_ids=torch.arange(T).expand(BATCH, T), parameters=extra)
    context.cp = types.SimpleNamespace(rank=0, size=2)  # what the model's context carries
    with pytest.raises(ValueError, match="runs without a cache"):
        layer(x, context, new_cache(config))
    with pytest.raises(ValueError, match="runs without a cache"):
        recurrent_group(new_cache(config), context)
