"""The fast decode path: fixed-shape state, one compiled per-token step, products built for it.

    model.generate(input_ids, max_new_tokens=64, cache_implementation="static")
    zoo generate CHECKPOINT --compile

is transformers' `generate` with these set up for it:

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
  ≈14M parameters (benchmarks/decode.py): the compiled step fuses each layer's norms, gates,
  state update and (next point) its batch-1 matrix products into C++ loops.
- **Decode products** (CPU only, `decode_linears`, both compiled steps): at batch 1 a step is
  matrix-vector products, every weight read once per token, and a BLAS may run them far below
  the CPU's memory bandwidth (MKL's GEMV on the project's AMD machine: the "gemv" and "products"
  figures of benchmarks/results/cpu_decode_generate_epyc.json). Inside `generate` every
  `nn.Linear` multiplies a single token as a reduction inductor compiles itself
  (`zoo.kernels.matvec`: one vectorized, threaded loop per weight, fused with the norm or gate
  before it, as fast as MKL's GEMV on an Intel Xeon and 2-3× faster on the AMD CPU), and softmax
  attention reads its cached keys and values the same way (`zoo.layers.attention.step_attention`).
  Several tokens (a batch) in the ahead-of-time step multiply through oneDNN's linear kernel
  (`torch.ops.mkldnn._linear_pointwise`) or ATen's, whichever ran the step's products faster on
  the machine (`batched_products_backend`, timed once per process: oneDNN on the AMD CPU, ATen
  on the Xeon); inductor lowers oneDNN's op only for constant weights, which AOTInductor's are
  and `torch.compile`'s are not, so `torch.compile`'s batched step keeps ATen. Weights, names and
  values never change: only the layers' forward is swapped, and the plain one is back when
  `generate` returns.

- **A lean loop** (CPU, `decode_loop`, standing in for transformers' `_sample` in greedy search
  and sampling): the same calls in the same order (the same tokens, the same draws from torch's
  generator, processors, stopping criteria and streamers as transformers' loop, tested), with
  the per-token Python work cut to what the step needs. In greedy search with nothing that
  reads the logits (no processor, no scores or logits kept) the ahead-of-time step returns the
  tokens themselves (`AheadOfTimeStep.tokens`: the argmax of the step's last logits, the same
  choice), which saves the loop ATen's argmax call. Around the same ahead-of-time step,
  transformers' loop took 0.18–0.22 ms more a step: the zoo's makes it 12–17% faster
  ("zoo_loop_over_transformers_loop" in benchmarks/results/cpu_decode_generate.json).

Nothing is frozen into the compiled graph: the weights stay inputs of the step, so training a
model between two `generate` calls needs no recompilation and can never leave stale weights.

**Ahead of time** (`compile_config=ahead_of_time_config()`, `zoo generate --aot`; CPU): the
step is exported (`torch.export`, the cache's tensors as inputs it updates in place) and compiled
by AOTInductor into a shared library, which each step calls with the token, its position, the
masks and the cache. `torch.compile`'s step pays on every token for dynamo's guards (over every
weight and the cache's Python state) and for inductor's Python wrapper; the library pays for
neither, and at batch 1 its step is the matrix-vector products and little else (the "generate"
rows of benchmarks/results/cpu_decode_generate*.json: compiled against ahead-of-time steps). It
reads the model's own weights in place (AOTInductor's user-managed constants, bound at the start
of each `generate`), so training between calls never leaves stale weights; what it is compiled
for (shapes, strides and dtypes of weights, cache and inputs; the step's other arguments) is
checked once per `generate`, and a new combination compiles anew (seconds to tens of seconds: a
C++ build). A model that cannot be exported (a MoE layer's routing has data-dependent shapes)
falls back to the `torch.compile` step, with a warning.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from transformers import (
    CompileConfig,
    GenerationConfig,
    LogitsProcessorList,
    MaxLengthCriteria,
    StoppingCriteriaList,
)
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import CausalLMOutputWithPast

from zoo.kernels.matvec import linear

logger = logging.getLogger(__name__)


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


def fast_path(
    model: nn.Module, kwargs: dict[str, Any]
) -> tuple[dict[str, Any], AbstractContextManager[Any]]:
    """`generate`'s keyword arguments with the fast path set up where they ask for a static cache
    (`cache_implementation="static"`, as an argument or in the generation config): a compile
    config for the model's device unless one is given or `disable_compile=True`; and the block
    to generate in, which on a CPU swaps the linear layers' products for the decode step's
    (`decode_linears`). Other calls pass through unchanged."""
    base = kwargs.get("generation_config") or model.generation_config
    cache = kwargs.get("cache_implementation", getattr(base, "cache_implementation", None))
    if cache != "static":
        return kwargs, nullcontext()
    if kwargs.get("disable_compile", base.disable_compile):
        return kwargs, nullcontext()
    if kwargs.get("compile_config") is None and base.compile_config is None:
        kwargs = {**kwargs, "compile_config": compile_config(model.device)}
    if model.device.type != "cpu":
        return kwargs, nullcontext()
    return kwargs, decode_linears(model)


# The backend of a batch's products in the step being exported ("onednn" or "aten"), set by
# `AheadOfTimeStep` around the export from `batched_products_backend`.
_EXPORT_BATCHED_BACKEND = "aten"


def _decode_forward(layer: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decode-step forward of a linear layer, made once per layer and kept on it: a compiled
    step guards on the functions it traced, and a new one per `generate` call would compile
    again. Several tokens in an exported step: oneDNN where it multiplied them faster here
    (`batched_products_backend`); otherwise `zoo.kernels.matvec.linear` (one token under
    compilation: `matvec`; else, as in the eager prefill, the plain product)."""
    forward = vars(layer).get("_zoo_decode_forward")
    if forward is None:

        def forward(x: torch.Tensor) -> torch.Tensor:
            if (
                _EXPORT_BATCHED_BACKEND == "onednn"
                and torch.compiler.is_exporting()
                and x.numel() != x.shape[-1]
            ):
                return torch.ops.mkldnn._linear_pointwise(
                    x, layer.weight, layer.bias, "none", [], ""
                )
            return linear(x, layer.weight, layer.bias)

        layer._zoo_decode_forward = forward
    return forward


def _cpu_linears(model: nn.Module) -> list[nn.Linear]:
    """The fp32/bf16 `nn.Linear` layers of `model` on a CPU: those a decode step's products
    change for (`decode_linears`, `batched_products_backend`)."""
    return [
        m for m in model.modules()
        if type(m) is nn.Linear and m.weight.device.type == "cpu"
        and m.weight.dtype in (torch.float32, torch.bfloat16)
    ]  # fmt: skip


@contextmanager
def decode_linears(model: nn.Module) -> Iterator[int]:
    """Inside the block every fp32/bf16 `nn.Linear` of `model` on a CPU multiplies the way a
    compiled decode step reads its weights fastest (module docstring; same values, same
    parameters); on exit the plain forward is back. Yields how many layers changed. Inference
    only: oneDNN's kernel has no backward."""
    layers = [m for m in _cpu_linears(model) if "forward" not in vars(m)]
    for layer in layers:
        layer.forward = _decode_forward(layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


# Which backend multiplied a batch faster, by (the layers' weight shapes and dtypes, rows).
_BATCHED_BACKENDS: dict[tuple[Any, ...], str] = {}


@torch.no_grad()
def batched_products_backend(model: nn.Module, rows: int) -> str:
    """ "onednn" or "aten": whichever ran one decode step's products (every CPU `nn.Linear` of
    `model` once, on `rows` rows) faster on this machine, timed once per process for these
    shapes (best of three after a warm-up, tens of milliseconds). The ahead-of-time step of a
    batch multiplies through it: oneDNN ran them 1.7-1.9× faster than ATen on the project's AMD
    CPU, 0.6-0.8× as fast on an Intel Xeon with MKL (benchmarks/results/, "products" rows)."""
    layers = _cpu_linears(model)
    if rows == 1 or not layers or not torch.backends.mkldnn.is_available():
        return "aten"
    key = (tuple((tuple(m.weight.shape), m.weight.dtype, m.bias is None) for m in layers), rows)
    if key not in _BATCHED_BACKENDS:
        pairs = [(torch.randn(rows, m.in_features, dtype=m.weight.dtype), m) for m in layers]
        onednn = torch.ops.mkldnn._linear_pointwise
        products = {
            "aten": lambda: [F.linear(x, m.weight, m.bias) for x, m in pairs],
            "onednn": lambda: [onednn(x, m.weight, m.bias, "none", [], "") for x, m in pairs],
        }
        seconds = {}
        for name, run in products.items():
            run()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            seconds[name] = min(times)
        _BATCHED_BACKENDS[key] = min(seconds, key=seconds.__getitem__)
        logger.info("batched decode products: %s (%s)", _BATCHED_BACKENDS[key], seconds)
    return _BATCHED_BACKENDS[key]


# --------------------------------------------------------------------------------------------
# The ahead-of-time step (AOTInductor)


@dataclass
class AheadOfTimeConfig(CompileConfig):
    """transformers' `CompileConfig` that asks a zoo model for the ahead-of-time decode step
    (`ahead_of_time_config`); the fields are those of inductor's default mode."""


def ahead_of_time_config() -> AheadOfTimeConfig:
    """The compile config of `generate(cache_implementation="static", compile_config=...)` that
    decodes through an AOTInductor-compiled step instead of `torch.compile`'s (module docstring).
    CPU only: on CUDA the default config's CUDA graphs already remove the per-step overhead."""
    config = AheadOfTimeConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
    return config


def cache_tensors(cache: Cache) -> dict[str, torch.Tensor]:
    """Every tensor a cache holds, by a stable name (`layer3.recurrent_states.0`, `layer0.keys`):
    recurrent and conv states, key/value slots and their fill counters."""
    out: dict[str, torch.Tensor] = {}
    for layer, attr, names in _cache_slots(cache):
        value = getattr(layer, attr)
        if isinstance(names, str):
            out[names] = value
        else:
            out |= {name: value[key] for key, name in names.items()}
    return out


def _cache_slots(cache: Cache) -> list[tuple[Any, str, str | dict[Any, str]]]:
    """(layer, attribute, name) of each tensor attribute of the cache's layers, and (layer,
    attribute, {key: name}) of each dict of tensors (recurrent and conv states per index)."""
    slots: list[tuple[Any, str, str | dict[Any, str]]] = []
    for i, layer in enumerate(cache.layers):
        for attr in sorted(vars(layer)):
            value, name = getattr(layer, attr), f"layer{i}.{attr}"
            if isinstance(value, torch.Tensor):
                slots.append((layer, attr, name))
            elif isinstance(value, dict):
                keys = {k: f"{name}.{k}" for k, t in value.items() if isinstance(t, torch.Tensor)}
                if keys:
                    slots.append((layer, attr, keys))
    return slots


def _chosen(logits: torch.Tensor, output: str) -> torch.Tensor:
    """A step's `output` ("logits", or "tokens": the greedy choice) from its logits."""
    return logits[:, -1].argmax(-1) if output == "tokens" else logits


class _StepModule(nn.Module):
    """One decode step as `torch.export` traces it: the model is a submodule (its weights keep
    their names, prefixed `model.`), the cache's tensors are an argument that the step updates in
    place (AOTInductor writes such inputs in place; as buffers bound to the library, the fill
    counter of a static layer was written back only on the first call), as are the step's tensor
    inputs (token, position, masks); its other inputs are fixed. It returns the logits, or with
    `output="tokens"` the greedy choice of each row's next token (their argmax at the last
    position). The `decode_constants()` of the model's modules (tensors derived from their
    weights) are its buffers, made from the current weights, named `derived.<module path>.<name>`
    (dots in the path doubled as `__`); `handing_constants` gives them to their modules while
    export traces the step, so the library reads them as constants bound like the weights."""

    def __init__(
        self, model: nn.Module, cache: Cache, options: dict[str, Any], output: str = "logits"
    ) -> None:
        super().__init__()
        self.model, self.cache, self.options, self.output = model, cache, options, output
        self.held = _cache_slots(cache)
        self.derived = nn.Module()
        self.deriving: list[tuple[nn.Module, nn.Module]] = []  # (module, its constants' holder)
        with torch.no_grad():
            for path, module in model.named_modules():
                if not callable(getattr(module, "decode_constants", None)):
                    continue
                holder = nn.Module()
                for name, value in module.decode_constants().items():
                    holder.register_buffer(name, value, persistent=False)
                self.derived.add_module(path.replace(".", "__"), holder)
                self.deriving.append((module, holder))

    @contextmanager
    def handing_constants(self) -> Iterator[None]:
        """Each module's derived constants as its `step_constants` (read by its step) meanwhile."""
        for module, holder in self.deriving:
            module.step_constants = dict(holder.named_buffers())
        try:
            yield
        finally:
            for module, _ in self.deriving:
                del module.step_constants

    def forward(self, inputs: dict[str, Any], states: dict[str, torch.Tensor]) -> torch.Tensor:
        # Trace the cache's updates as updates of `states`: the cache's layers hold them while
        # the model runs (new attribute values, the old ones put back after).
        old = [getattr(layer, attr) for layer, attr, _ in self.held]
        for (layer, attr, names), value in zip(self.held, old, strict=True):
            if isinstance(names, str):
                setattr(layer, attr, states[names])
            else:
                setattr(layer, attr, {k: states[names[k]] if k in names else v
                                      for k, v in value.items()})  # fmt: skip
        try:
            return _chosen(
                self.model(**inputs, **self.options, cache=self.cache).logits, self.output
            )
        finally:
            for (layer, attr, _), value in zip(self.held, old, strict=True):
                setattr(layer, attr, value)


_PLAIN = (bool, int, float, str, type(None))


def _tensor_leaves(tree: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors among `pytree.tree_leaves(tree)`, in its order (a dict's values in insertion
    order, depth first): the library's input order. A step's inputs are a dict of tensors, plain
    values and a dict of masks, walked here directly, without pytree's general walk (its node
    objects, every token). Anything else goes to pytree."""
    flat: list[torch.Tensor] = []
    for value in tree.values():
        if isinstance(value, torch.Tensor):
            flat.append(value)
        elif type(value) is dict:
            flat += _tensor_leaves(value)
        elif not isinstance(value, _PLAIN):
            flat += [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
    return flat


def _layout(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device.type)


# Inductor's settings for a step's library. A loop runs on one thread where each thread's share
# would be under `cpp.min_chunk_size` elements (512 by default): on the project's 2-core CPU a
# one-token step's loops over Mamba's 768 channels (its conv, its gate) ran on one thread while
# the other waited at the next barrier; 256 splits them (the README's decode run measures it).
_STEP_INDUCTOR_CONFIGS = {"cpp.min_chunk_size": 256}


class _Runner:
    """One compiled step: the loaded AOTInductor library and the names of the weights it reads
    in place (the model's parameters and buffers, user-managed constants of the library)."""

    def __init__(
        self,
        module: _StepModule,
        inputs: dict[str, Any],
        states: dict[str, torch.Tensor],
        batched_backend: str,
    ) -> None:
        global _EXPORT_BATCHED_BACKEND
        logger.info("compiling the decode step ahead of time (AOTInductor: a C++ build)")
        # The export's own notes (the attributes the step swaps and puts back, torch's
        # deprecations) are about torch's internals, nothing a user can act on.
        with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="zoo-decode-") as tmp:
            warnings.simplefilter("ignore")
            kwargs = {"inputs": inputs, "states": states}
            _EXPORT_BATCHED_BACKEND = batched_backend
            try:
                with module.handing_constants():
                    program = torch.export.export(module, (), kwargs, strict=True)
            finally:
                _EXPORT_BATCHED_BACKEND = "aten"
            path = torch._inductor.aoti_compile_and_package(
                program,
                package_path=str(Path(tmp) / "step.pt2"),
                inductor_configs=_STEP_INDUCTOR_CONFIGS,
            )
            self.library = torch._inductor.aoti_load_package(path)
        self.constants = list(self.library.get_constant_fqns())

    def bind(self, module: _StepModule) -> None:
        """Point the library at `module`'s weights and derived constants (no copy). Constants
        the export made of tensors created inside the step stay the library's own. The library
        does not own what it is pointed at: the runner keeps the derived constants alive (not the
        model: `_RUNNERS` holds runners weakly by model)."""
        tensors = dict(module.named_parameters(remove_duplicate=False))
        tensors |= dict(module.named_buffers(remove_duplicate=False))
        self.library.load_constants(
            {name: tensors[name] for name in self.constants if name in tensors},
            check_full_update=False,
            user_managed=True,
        )
        self.derived = module.derived


# Compiled steps per model, by what they were compiled for (weak: they go with the model).
_RUNNERS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], _Runner | str]] = (
    weakref.WeakKeyDictionary()
)


class AheadOfTimeStep:
    """The decode step `generate` calls in place of the model (`ZooForCausalLM.get_compiled_call`
    with an `AheadOfTimeConfig`): one per `generate` call. Its first call finds or compiles the
    library for what it is given (the weights', cache's and inputs' shapes, strides and dtypes,
    the step's other arguments) and binds it to the model's weights and this cache; later calls
    only check that the cache and the input shapes are the same, then run the library."""

    def __init__(self, model: nn.Module, fallback: Callable[[], Callable[..., Any]]) -> None:
        self.model, self.fallback = model, fallback
        self.cache: Cache | None = None
        self.states: list[torch.Tensor] = []
        self.shapes: tuple[Any, ...] = ()
        self.output = "logits"
        self.run: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
        self.compiled_call: Callable[..., Any] | None = None

    def __call__(self, **kwargs: Any) -> Any:
        if self.compiled_call is not None:
            return self.compiled_call(**kwargs)
        return CausalLMOutputWithPast(logits=self.logits(**kwargs), cache=kwargs["cache"])

    def logits(self, **kwargs: Any) -> torch.Tensor:
        """The step's logits alone (what `decode_loop` reads)."""
        return self._run("logits", kwargs)

    def tokens(self, **kwargs: Any) -> torch.Tensor:
        """The greedy choice of each row's next token, (B,): the argmax of the step's last
        logits, taken inside the compiled step (`decode_loop`, when nothing else reads the
        logits). A library of its own, compiled on first use."""
        return self._run("tokens", kwargs)

    def _run(self, output: str, kwargs: dict[str, Any]) -> torch.Tensor:
        if self.compiled_call is not None:
            return _chosen(self.compiled_call(**kwargs).logits, output)
        cache = kwargs.pop("cache")
        flat = _tensor_leaves(kwargs)
        shapes = tuple(x.shape for x in flat)
        if (
            self.run is None or cache is not self.cache or shapes != self.shapes
            or output != self.output
        ):  # fmt: skip
            tensor_inputs = {
                k: v for k, v in kwargs.items()
                if any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v))
            }  # fmt: skip
            self._bind(cache, kwargs, tensor_inputs, output)
            if self.compiled_call is not None:
                return _chosen(self.compiled_call(cache=cache, **kwargs).logits, output)
            self.shapes, self.output = shapes, output
        assert self.run is not None
        return self.run([*flat, *self.states])[0]

    def _bind(
        self, cache: Cache, kwargs: dict[str, Any], tensor_inputs: dict[str, Any], output: str
    ) -> None:
        options = {k: v for k, v in kwargs.items() if k not in tensor_inputs}
        module = _StepModule(self.model, cache, options, output)
        states = cache_tensors(cache)
        tokens = tensor_inputs.get("input_ids")
        tokens = tensor_inputs.get("inputs_embeds") if tokens is None else tokens
        rows = 1 if tokens is None else tokens.shape[0] * tokens.shape[1]
        backend = batched_products_backend(self.model, rows)
        key = (
            tuple((n, _layout(t)) for n, t in module.state_dict(keep_vars=True).items()),
            tuple((n, _layout(t)) for n, t in states.items()),
            tuple(_layout(x) if isinstance(x, torch.Tensor) else x
                  for x in pytree.tree_leaves(tensor_inputs)),
            pytree.tree_structure(tensor_inputs),
            tuple(sorted(options.items())),
            self.model.training,
            output,
            backend,
        )  # fmt: skip
        runners = _RUNNERS.setdefault(self.model, {})
        if key not in runners:
            try:
                runners[key] = _Runner(module, tensor_inputs, states, backend)
            except Exception as exc:  # export's and AOTInductor's errors have no common base
                runners[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        runner = runners[key]
        if isinstance(runner, str):
            logger.warning(
                "the ahead-of-time decode step could not be built (%s); decoding through "
                "torch.compile's step instead",
                runner,
            )
            self.compiled_call = self.fallback()
            return
        runner.bind(module)
        self.cache, self.states = cache, list(states.values())
        self.run = runner.library.loader.boxed_run


def runs_decode_loop(
    model: nn.Module,
    generation_config: GenerationConfig,
    stopping_criteria: StoppingCriteriaList,
    synced_gpus: bool,
    model_kwargs: dict[str, Any],
) -> bool:
    """Whether `decode_loop` stands in for transformers' `_sample` (greedy search and sampling):
    on a CPU, over a compilable (static) cache, for a prompt of token ids, with a maximum length
    (transformers always sets one); not where per-step attentions or hidden states are asked
    for, for an assistant model, or for synchronized GPUs."""
    cache, config = model_kwargs.get("cache"), generation_config
    return (
        model.device.type == "cpu"
        and not synced_gpus
        and not config.is_assistant
        and not (config.return_dict_in_generate
                 and (config.output_attentions or config.output_hidden_states))
        and getattr(cache, "is_compileable", False)
        and model_kwargs.get("inputs_embeds") is None
        and model_kwargs.get("use_cache", True)
        # what a decode step's inputs are built from (`ZooForCausalLM._decode_step_inputs`)
        and set(model_kwargs) <= model._DECODE_STEP_KEYS | {"cache", "inputs_embeds"}
        and stopping_criteria.max_length is not None
    )  # fmt: skip


def _counts_to_the_end(stopping_criteria: StoppingCriteriaList, end: int) -> bool:
    """Whether the only stop is the length: then the loop counts tokens instead of asking."""
    return all(
        type(c) is MaxLengthCriteria
        and (c.max_position_embeddings is None or end <= c.max_position_embeddings)
        for c in stopping_criteria
    )


@torch.no_grad()
def decode_loop(
    model: Any,
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    streamer: Any,
    model_kwargs: dict[str, Any],
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """transformers' `_sample` (greedy search and multinomial sampling) for the decode path
    (`runs_decode_loop`): the same prefill, steps, processors, token choice, stopping criteria
    and streamer calls in the same order, so the same tokens and the same draws from torch's
    generator, with the per-token Python work a compiled step leaves cut to what it needs. The
    tokens, mask and positions are written into buffers of the final length (a step reads views,
    the general loop grows three tensors a column per token); a step's inputs are built directly
    (`ZooForCausalLM._decode_step_inputs`); the ahead-of-time step returns its logits without an
    output dataclass; logits are copied only where a processor or the output could keep or
    change them; a length-only stop is counted, not asked of the criteria each token; a
    static cache's masks are built directly (`zoo.cache.static_step_masks`)."""
    config = generation_config
    step: Any = (
        model.get_compiled_call(config.compile_config)
        if model._valid_auto_compile_criteria(model_kwargs, config)
        else model.__call__
    )
    run = step.logits if isinstance(step, AheadOfTimeStep) else lambda **x: step(**x).logits
    outputs = model._prefill(input_ids, config, model_kwargs, is_first_iteration=True)
    model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
    logits = outputs.logits[:, -1]
    del outputs  # the prompt's logits may be large

    batch, length = input_ids.shape
    end = stopping_criteria.max_length
    ids = input_ids.new_empty(batch, max(end, length + 1))
    ids[:, :length] = input_ids
    # The mask and positions grown to their final length at once (a view per step).
    grown = {k: model_kwargs.pop(k) for k in ("attention_mask", "position_ids")
             if model_kwargs.get(k) is not None}  # fmt: skip
    grown = model._update_model_kwargs_for_generation(
        {}, grown, num_new_tokens=ids.shape[1] - (length + 1)
    )
    options = {k: v for k, v in model_kwargs.items() if k not in grown}  # the cache among them

    pad = config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    counted = _counts_to_the_end(stopping_criteria, end)
    keep = config.return_dict_in_generate
    scores: tuple[torch.Tensor, ...] | None = () if keep and config.output_scores else None
    raw: tuple[torch.Tensor, ...] | None = () if keep and config.output_logits else None
    copy = bool(logits_processor) or raw is not None or scores is not None
    # Greedy search where nothing else reads the logits: the ahead-of-time step returns the
    # tokens (their argmax, the same choice, taken in the compiled step).
    chosen: torch.Tensor | None = None
    choose = isinstance(step, AheadOfTimeStep) and not copy and not config.do_sample
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    while True:
        if chosen is not None:
            tokens = chosen
        else:
            if copy:  # as transformers: a float32 copy that processors may change in place
                logits = logits.to(copy=True, dtype=torch.float32)
                if raw is not None:
                    raw += (logits,)
            else:
                logits = logits.float()
            next_scores = logits_processor(ids[:, :length], logits) if logits_processor else logits
            if scores is not None:
                scores += (next_scores,)
            if config.do_sample:
                probs = F.softmax(next_scores, dim=-1)
                tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                tokens = torch.argmax(next_scores, dim=-1)
        if has_eos:  # finished rows get the padding token
            tokens = tokens * unfinished + pad * (1 - unfinished)
        ids[:, length] = tokens
        length += 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        if counted:
            if length >= end:
                break
        else:
            unfinished = unfinished & ~stopping_criteria(ids[:, :length], scores)
            if unfinished.max() == 0:
                break
        inputs = model._decode_step_inputs(
            ids[:, :length], **{k: v[:, :length] for k, v in grown.items()}, **options
        )
        if choose:
            chosen = step.tokens(**inputs, return_dict=True)
        else:
            logits = run(**inputs, return_dict=True)[:, -1]

    if streamer is not None:
        streamer.end()
    sequences = ids[:, :length].contiguous()
    if not keep:
        return sequences
    return GenerateDecoderOnlyOutput(
        sequences=sequences, scores=scores, logits=raw, cache=options["cache"]
    )
