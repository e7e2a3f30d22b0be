"""The fast decode path: fixed-shape state, one compiled per-token step, weights laid out for GEMV.

    model.generate(input_ids, max_new_tokens=64, cache_implementation="static")
    zoo generate CHECKPOINT --compile

is transformers' own generation loop with three things set up for it:

- **Fixed-shape state.** `cache_implementation="static"` makes transformers build a
  `StaticCache` from `ZooConfig.layer_types`: the recurrent mixers keep their fixed-size states
  (`LinearAttentionLayer`, updated in place), softmax attention keeps keys and values in a fixed
  number of slots (`StaticLayer`), and the model masks the unfilled ones (`zoo.cache.static_masks`);
  Hyena keeps its input history in such slots too and convolves all of them with lag-gathered
  taps (`zoo.layers.hyena`).
  No shape changes from one token to the next and no step reads a tensor's value on the host,
  so the step is traced once (`tests/test_decode.py` checks it has no graph break).
- **A compiled step.** transformers compiles the model's call for the decode steps (the prefill
  runs eagerly) when the cache is static: on CUDA with `mode="reduce-overhead"` (CUDA graphs), its
  default; on any other device transformers does not compile, so the zoo passes
  `compile_config(device)`, inductor's default mode. Measured on this project's 2-core CPU at
  ≈14M parameters (benchmarks/decode.py): the compiled step fuses each layer's norms, gates and
  state update into a few C++ kernels and leaves the matrix products to the BLAS.
- **GEMV-friendly weights** (CPU only, `decode_layout`): at batch 1 every weight is read once per
  token by a matrix-vector product, and how fast depends on the layout. `nn.Linear` keeps W as
  (out, in) rows, so y = W x is `out` dot products of `in` contiguous floats; stored
  column-major, the same product streams contiguous rows of Wᵀ into y. For the zoo's
  hidden-384 models the second ran faster on this CPU (benchmarks/results/cpu_decode.json,
  "gemv" of each row), and so did batch-1 decoding. Only for one sequence (a batch multiplies
  matrices, which the BLAS packs itself) and only inside `generate`: the values, shapes and
  names stay, and the usual layout is back when it returns.

Nothing is frozen into the compiled graph: the weights stay inputs of the step, so training a
model between two `generate` calls needs no recompilation and can never leave stale weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from transformers import CompileConfig


def compile_config(device: torch.device | str) -> CompileConfig:
    """transformers' `CompileConfig` of the zoo's decode step on `device`.

    CUDA: transformers' default (CUDA graphs through `mode="reduce-overhead"`). Elsewhere:
    inductor's default mode (CUDA graphs do not exist there), allowed on every device.
    Not `fullgraph`: a MoE layer's routed experts run outside the graph (their shapes are data,
    `zoo.layers.moe`), and every other layer is checked break-free by the tests.
    """
    if torch.device(device).type == "cuda":
        return CompileConfig(fullgraph=False, mode="reduce-overhead")
    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
    return config


@contextmanager
def decode_layout(model: nn.Module) -> Iterator[int]:
    """Inside the block every `nn.Linear` weight of `model` is stored column-major (values,
    shapes and names unchanged), the layout a batch-1 matrix-vector product reads fastest on a
    CPU; on exit the usual row-major storage is back, so training, saving and converting never
    see the other layout. Yields how many weights changed (already column-major ones stay)."""
    weights = {
        id(module.weight): module.weight
        for module in model.modules()
        if isinstance(module, nn.Linear) and module.weight.is_contiguous()
    }
    with torch.no_grad():
        for weight in weights.values():
            weight.data = weight.data.t().contiguous().t()
        try:
            yield len(weights)
        finally:
            for weight in weights.values():
                weight.data = weight.data.contiguous()


def fast_path(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[dict[str, Any], AbstractContextManager[Any]]:
    """`generate`'s keyword arguments with the fast path set up where they ask for a static cache
    (`cache_implementation="static"`, as an argument or in the generation config): a compile
    config for the model's device unless one is given or `disable_compile=True`; and the block
    to generate in, which for one sequence on a CPU lays the weights out for GEMV
    (`decode_layout`; a batch multiplies matrices, which the usual layout serves better). Other
    calls pass through unchanged."""
    base = kwargs.get("generation_config") or model.generation_config
    cache = kwargs.get("cache_implementation", getattr(base, "cache_implementation", None))
    if cache != "static":
        return kwargs, nullcontext()
    if kwargs.get("disable_compile", base.disable_compile):
        return kwargs, nullcontext()
    if kwargs.get("compile_config") is None and base.compile_config is None:
        kwargs = {**kwargs, "compile_config": compile_config(model.device)}
    inputs = next(
        (x for x in (*args[:1], kwargs.get("inputs"), kwargs.get("input_ids"),
                     kwargs.get("inputs_embeds")) if isinstance(x, torch.Tensor)),
        None,
    )  # fmt: skip
    one_row = inputs is None or inputs.shape[0] == 1
    if model.device.type == "cpu" and one_row:
        return kwargs, decode_layout(model)
    return kwargs, nullcontext()
