"""The registry: what a sequence mixer, a channel mixer and a family are, in one place.

A model of the zoo is a stack of blocks, each a sequence mixer and a channel mixer (see
`zoo.configuration`). Everything the rest of the code needs to know about one mixer lives in its
entry here: the layer class (imported on first use, so a model loads only the mixers it stacks),
the kind of decode state it keeps (which transformers cache layer holds it), its own config
settings with defaults, one-line docs and checks, the fields a layer may override for itself,
the parameters it needs the model to hold for all its layers, and the settings that make a small
test model of it. A family entry names a preset config class and how to make a tiny and a demo
model of it. Every list of mixers or families elsewhere (config validation, the cache layout,
recipes, the CLI, cards, MAD, STAR, tests) is read from here.

Settings stay flat keys of `config.json` (`mamba_d_state`), as they always were, so checkpoints
written before this registry load unchanged; the entry that declares a key owns it.

Extending the zoo from your own module (README, "Add a mixer"):

    zoo.register_mixer("toy", ToyMixer, cache="linear_attention",
                       settings={"toy_rank": Setting(4, "rank of ...", positive_int)})
    config = zoo.HybridConfig.from_pattern("toy:swiglu attention:swiglu", toy_rank=8)

The layer class must follow `SequenceMixerLayer` below; `tests/test_registry.py` holds every
registered mixer to it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

# The transformers cache layer types (`DynamicCache(config=...)` reads `layer_types`): a state of
# fixed size (recurrent and conv states) or one that grows with the context (keys and values).
CACHE_KINDS: tuple[str, ...] = ("linear_attention", "full_attention")


class RegistryError(ValueError):
    """A name that is not registered, or a registration that conflicts with another."""


# -- settings -----------------------------------------------------------------------------------

Check = Callable[[Any], "str | None"]
"""A value check: None when the value is fine, else what it must be ("must be ...")."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(value: Any) -> str | None:
    return None if _is_int(value) and value > 0 else "must be a positive integer"


def positive_number(value: Any) -> str | None:
    return None if _is_number(value) and value > 0 else "must be positive"


def non_negative_number(value: Any) -> str | None:
    return None if _is_number(value) and value >= 0 else "must be a number >= 0"


def finite_number(value: Any) -> str | None:
    return None if _is_number(value) and math.isfinite(value) else "must be a finite number"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def int_at_least(low: int) -> Check:
    def check(value: Any) -> str | None:
        return None if _is_int(value) and value >= low else f"must be an integer >= {low}"

    return check


def odd_int_at_least(low: int) -> Check:
    def check(value: Any) -> str | None:
        ok = _is_int(value) and value >= low and value % 2 == 1
        return None if ok else f"must be an odd integer >= {low}"

    return check


@dataclass(frozen=True)
class one_of:
    """One of the `allowed` values (kept as `.allowed` for help texts and tests)."""

    allowed: tuple[Any, ...]

    def __init__(self, *allowed: Any) -> None:
        object.__setattr__(self, "allowed", allowed)

    def __call__(self, value: Any) -> str | None:
        return None if value in self.allowed else f"is not one of {list(self.allowed)}"


def optional(inner: Check) -> Check:
    """None, or a value `inner` accepts."""

    def check(value: Any) -> str | None:
        return None if value is None else inner(value)

    return check


@dataclass(frozen=True)
class Setting:
    """One config key a mixer owns: its default, a one-line doc and its check.

    `derive` computes the value from the rest of the config when it is None (after the defaults
    are filled), e.g. the K/V heads of attention from its query heads; the derived value is what
    the config keeps.
    """

    default: Any
    doc: str
    check: Check | None = None
    derive: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class ModelParameter:
    """A parameter the model holds once for every layer of one mixer (HGRN2's lower bounds Γ,
    shared through a softmax over depth). Mixers read it as `context.parameters[name]`."""

    shape: Callable[[Any], tuple[int, ...]]
    """Its shape, from the model config."""
    init: Callable[[Any], None]
    """Fills it in place at initialisation (loaded weights are left alone)."""
    doc: str


# -- what a layer must provide ------------------------------------------------------------------


@runtime_checkable
class SequenceMixerLayer(Protocol):
    """The contract of a sequence mixer, built as `Layer(config, layer_idx)` with the config of
    its layer (`config.for_layer(i)`).

    `forward` without a cache is the parallel form over the whole input; with one it reads and
    writes its own state at `layer_idx` (a prefill of any length, then one token a step) and must
    give the same outputs. `reference_forward` is the naive form (token by token, fp32) that
    tests compare against. Padded tokens (`context.token_mask` False) must not change the
    outputs or the state of the real ones.
    """

    def forward(self, hidden_states: Any, context: Any, cache: Any = None) -> Any: ...

    def reference_forward(self, hidden_states: Any, context: Any) -> Any: ...

    def state_size(self, batch: int, seq_len: int) -> int:
        """Elements the cache holds for this layer after `seq_len` tokens of `batch` rows."""
        ...

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token at context `seq_len` (conventions in `zoo.flops`)."""
        ...


@runtime_checkable
class ChannelMixerLayer(Protocol):
    """The contract of a channel mixer, built as `Layer(config)` with its layer's config:
    `forward(hidden_states)` token by token (a routed one also takes the token mask and returns
    `(hidden_states, router_logits)`), and its FLOPs per token."""

    def forward(self, hidden_states: Any, *args: Any) -> Any: ...

    def flops_per_token(self, seq_len: int) -> int: ...


# -- entries ------------------------------------------------------------------------------------


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class SequenceMixer:
    """A sequence mixer: the name config.json writes in `mixers` and what it stands for."""

    name: str
    layer: str | type
    """The layer class, or "module:Class" to import it on first use."""
    cache: str
    """Its decode state: "linear_attention" (fixed size) or "full_attention" (grows)."""
    display_name: str
    doc: str
    settings: Mapping[str, Setting] = field(default_factory=dict)
    per_layer: tuple[str, ...] = ()
    """Config fields one layer of this mixer may set for itself in `layer_overrides`."""
    validate: Callable[[Any], None] | None = None
    """Checks that span settings and the backbone, run on the config of every layer that uses
    this mixer; raises ValueError naming the fields."""
    model_parameters: Mapping[str, ModelParameter] = field(default_factory=dict)
    tiny: Mapping[str, Any] = field(default_factory=dict)
    """Settings that make a test-sized layer fast (small states, short chunks)."""
    kv_sharing: bool = False
    """Whether a layer can read another layer's keys and values (`kv_source`)."""
    module: str = "zoo"
    """The module of its layer class: a config naming this mixer needs it imported to load."""

    def layer_class(self) -> type:
        return _import(self.layer) if isinstance(self.layer, str) else self.layer


@dataclass(frozen=True)
class ChannelMixer:
    """A channel mixer: the name config.json writes in `channel_mixers`."""

    name: str
    layer: str | type | None
    """The layer class, "module:Class", or None for no channel mixer at all."""
    display_name: str
    doc: str
    settings: Mapping[str, Setting] = field(default_factory=dict)
    per_layer: tuple[str, ...] = ()
    validate: Callable[[Any], None] | None = None
    routed: bool = False
    """A MoE layer: forward takes the token mask and returns (output, router logits), and the
    model adds the router losses."""
    module: str = "zoo"

    def layer_class(self) -> type | None:
        return _import(self.layer) if isinstance(self.layer, str) else self.layer


@dataclass(frozen=True)
class Family:
    """A family: a preset config class (its `model_type`, default mixers, named sizes and
    defaults) and how to make small models of it."""

    name: str
    """The preset name of recipes and the CLI (`zoo_<name>` is the model_type)."""
    config: str | type
    """The preset class, or "module:Class"."""
    display_name: str
    card_vocab: int
    """The vocabulary its named sizes are counted with in `model_cards/` (its papers')."""
    tiny: Mapping[str, Any] = field(default_factory=dict)
    """Fields of its tiny test model on top of the backbone's and its mixers' tiny settings."""
    demo: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """Fields of its `zoo demo` model given the demo's shared fields (None: those alone)."""
    module: str = "zoo"

    def config_class(self) -> Any:
        return _import(self.config) if isinstance(self.config, str) else self.config

    def tiny_config(self, **overrides: Any) -> Any:
        """A tiny model of the family (hidden 48, 3 layers): what the test suite builds."""
        cls = self.config_class()
        mixers = overrides.get("mixers") or self.tiny.get("mixers") or [cls.default_mixer]
        fields: dict[str, Any] = dict(TINY_BACKBONE)
        for name in dict.fromkeys(mixers):
            fields.update(sequence_mixer(name).tiny)
        return cls(**{**fields, **self.tiny, **overrides})

    def demo_fields(self, shared: dict[str, Any]) -> dict[str, Any]:
        return {**shared, **(self.demo(shared) if self.demo else {})}


# The backbone of every tiny test model; lengths used in tests (13, 37) are no chunk multiples.
TINY_BACKBONE: Mapping[str, Any] = MappingProxyType(
    {"hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4}
)

_SEQUENCE: dict[str, SequenceMixer] = {}
_CHANNEL: dict[str, ChannelMixer] = {}
_FAMILIES: dict[str, Family] = {}


def _module_of(thing: str | type | None) -> str:
    """The module a layer or config class lives in: what a process must import to have it."""
    if thing is None:
        return __name__
    return thing.partition(":")[0] if isinstance(thing, str) else thing.__module__


def _check_name(name: str, kind: str) -> None:
    if not isinstance(name, str) or not name.replace("_", "").isalnum() or name != name.lower():
        raise RegistryError(f"{kind} name {name!r}: use lowercase letters, digits and _")


def _check_settings(owner: str, settings: Mapping[str, Setting]) -> None:
    """A key is owned once (entries that share a settings table share its objects)."""
    for key, setting in settings.items():
        for other, theirs in all_settings().items():
            if key == other and theirs is not setting:
                raise RegistryError(f"{owner}: setting {key!r} is already declared elsewhere")


def register_mixer(
    name: str,
    layer: str | type,
    *,
    cache: str,
    display_name: str | None = None,
    doc: str = "",
    settings: Mapping[str, Setting] | None = None,
    per_layer: tuple[str, ...] = (),
    validate: Callable[[Any], None] | None = None,
    model_parameters: Mapping[str, ModelParameter] | None = None,
    tiny: Mapping[str, Any] | None = None,
    kv_sharing: bool = False,
    replace: bool = False,
) -> SequenceMixer:
    """Register a sequence mixer under `name` (see the module docstring); returns its entry.

    After this, `name` works in `mixers=[...]`, `HybridConfig.from_pattern`, recipes, MAD and
    STAR. A config that names it records the registering module in `mixer_modules`, so loading
    it elsewhere says which module to import.
    """
    _check_name(name, "mixer")
    if cache not in CACHE_KINDS:
        raise RegistryError(f"mixer {name!r}: cache={cache!r} is not one of {list(CACHE_KINDS)}")
    if (name in _SEQUENCE or name in _CHANNEL) and not replace:
        raise RegistryError(f"mixer {name!r} is already registered (pass replace=True)")
    settings = dict(settings or {})
    _check_settings(f"mixer {name!r}", {k: v for k, v in settings.items()})
    entry = SequenceMixer(
        name=name,
        layer=layer,
        cache=cache,
        display_name=display_name or name,
        doc=doc,
        settings=MappingProxyType(settings),
        per_layer=tuple(per_layer),
        validate=validate,
        model_parameters=MappingProxyType(dict(model_parameters or {})),
        tiny=MappingProxyType(dict(tiny or {})),
        kv_sharing=kv_sharing,
        module=_module_of(layer),
    )
    _SEQUENCE[name] = entry
    return entry


def register_channel_mixer(
    name: str,
    layer: str | type | None,
    *,
    display_name: str | None = None,
    doc: str = "",
    settings: Mapping[str, Setting] | None = None,
    per_layer: tuple[str, ...] = (),
    validate: Callable[[Any], None] | None = None,
    routed: bool = False,
    replace: bool = False,
) -> ChannelMixer:
    """Register a channel mixer under `name`; it then works in `channel_mixers=[...]`."""
    _check_name(name, "channel mixer")
    if (name in _CHANNEL or name in _SEQUENCE) and not replace:
        raise RegistryError(f"channel mixer {name!r} is already registered (pass replace=True)")
    settings = dict(settings or {})
    _check_settings(f"channel mixer {name!r}", settings)
    entry = ChannelMixer(
        name=name,
        layer=layer,
        display_name=display_name or name,
        doc=doc,
        settings=MappingProxyType(settings),
        per_layer=tuple(per_layer),
        validate=validate,
        routed=routed,
        module=_module_of(layer),
    )
    _CHANNEL[name] = entry
    return entry


def register_family(
    name: str,
    config: str | type,
    *,
    display_name: str | None = None,
    card_vocab: int = 50_280,
    tiny: Mapping[str, Any] | None = None,
    demo: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    replace: bool = False,
) -> Family:
    """Register a family (its preset config class). `zoo.register_family` also makes its model
    classes and registers them with transformers' Auto classes."""
    _check_name(name, "family")
    if name in _FAMILIES and not replace:
        raise RegistryError(f"family {name!r} is already registered (pass replace=True)")
    entry = Family(
        name=name,
        config=config,
        display_name=display_name or name,
        card_vocab=card_vocab,
        tiny=MappingProxyType(dict(tiny or {})),
        demo=demo,
        module=_module_of(config),
    )
    _FAMILIES[name] = entry
    return entry


def unregister_mixer(name: str) -> None:
    """Remove a sequence or channel mixer registered outside the zoo (tests, notebooks)."""
    for table in (_SEQUENCE, _CHANNEL):
        entry = table.get(name)
        if entry is not None:
            if entry.module.startswith("zoo."):
                raise RegistryError(f"mixer {name!r} is the zoo's own and cannot be removed")
            del table[name]
            return
    raise _unknown("mixer", name, {**_SEQUENCE, **_CHANNEL})


def unregister_family(name: str) -> None:
    """Remove a family registered outside the zoo (its Auto-class entries stay, unused)."""
    entry = family(name)
    if entry.module.startswith("zoo."):
        raise RegistryError(f"family {name!r} is the zoo's own and cannot be removed")
    del _FAMILIES[name]


def _unknown(kind: str, name: Any, known: Mapping[str, Any]) -> RegistryError:
    return RegistryError(f"{name!r} is not a registered {kind}; allowed: {sorted(known)}")


def sequence_mixer(name: str) -> SequenceMixer:
    if name not in _SEQUENCE:
        raise _unknown("sequence mixer", name, _SEQUENCE)
    return _SEQUENCE[name]


def channel_mixer(name: str) -> ChannelMixer:
    if name not in _CHANNEL:
        raise _unknown("channel mixer", name, _CHANNEL)
    return _CHANNEL[name]


def family(name: str) -> Family:
    if name not in _FAMILIES:
        raise _unknown("family", name, _FAMILIES)
    return _FAMILIES[name]


def sequence_mixers() -> Mapping[str, SequenceMixer]:
    """Every registered sequence mixer by name, in registration order."""
    return MappingProxyType(_SEQUENCE)


def channel_mixers() -> Mapping[str, ChannelMixer]:
    return MappingProxyType(_CHANNEL)


def families() -> Mapping[str, Family]:
    return MappingProxyType(_FAMILIES)


def family_of(config_class: type) -> Family:
    """The family whose preset is `config_class` (or one of its bases)."""
    for entry in _FAMILIES.values():
        if issubclass(config_class, entry.config_class()):
            return entry
    raise RegistryError(f"{config_class.__name__} is not the preset of a registered family")


def all_settings() -> dict[str, Setting]:
    """Every setting of every registered mixer, by config key."""
    out: dict[str, Setting] = {}
    for entry in (*_SEQUENCE.values(), *_CHANNEL.values()):
        out.update(entry.settings)
    return out


def per_layer_fields() -> tuple[str, ...]:
    """Every field some mixer lets a layer override."""
    names = (f for e in (*_SEQUENCE.values(), *_CHANNEL.values()) for f in e.per_layer)
    return tuple(dict.fromkeys(names))


# -- the zoo's own mixers -----------------------------------------------------------------------


def _check_attention(config: Any) -> None:
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(
            f"num_key_value_heads={config.num_key_value_heads} does not divide "
            f"num_attention_heads={config.num_attention_heads}"
        )
    if config.attention_head_dim is not None:
        if config.attention_head_dim % 2:
            raise ValueError(
                f"attention_head_dim={config.attention_head_dim} is odd; RoPE needs an even one"
            )
    elif config.head_dim % 2:  # RoPE rotates pairs of channels
        raise ValueError(
            f"hidden_size={config.hidden_size} / num_attention_heads="
            f"{config.num_attention_heads} gives an odd head size {config.head_dim}; RoPE needs "
            "an even one"
        )


# RoPE scalings the attention implements, with transformers' numbers (zoo.layers.rotary).
_ROPE_SCALING_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "linear": ("factor",),
        "llama3": (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ),
        "yarn": ("factor", "original_max_position_embeddings"),
        "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    }
)


def _check_rotary_scaling(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        return "is not None or a dict with a 'rope_type'"
    rope_type = value.get("rope_type")
    if rope_type not in _ROPE_SCALING_KEYS:
        return (
            f"has rope_type={rope_type!r}; supported: {list(_ROPE_SCALING_KEYS)} (None for plain "
            "RoPE; 'dynamic' depends on the lengths of earlier calls and is not supported)"
        )
    if "rope_theta" in value:
        return "holds 'rope_theta'; the RoPE base is rotary_base"
    missing = [k for k in _ROPE_SCALING_KEYS[rope_type] if k not in value]
    if missing:
        return f"lacks {missing} for rope_type={rope_type!r}"
    return None


register_mixer(
    "attention",
    "zoo.layers.attention:Attention",
    cache="full_attention",
    display_name="LLaMA attention",
    doc="Softmax attention with RoPE and grouped-query heads (LLaMA, arXiv 2302.13971).",
    settings={
        "num_key_value_heads": Setting(
            None,
            "Key/value heads (grouped-query attention); None = num_attention_heads.",
            positive_int,
            derive=lambda c: c.num_attention_heads,
        ),
        "rotary_base": Setting(10000.0, "RoPE base wavelength.", positive_number),
        "rotary_scaling": Setting(
            None,
            "RoPE scaling: None (plain RoPE) or transformers' rope_parameters without rope_theta "
            "({'rope_type': 'llama3', 'factor': 8.0, ...}); linear, yarn, llama3, longrope.",
            _check_rotary_scaling,
        ),
        "attention_head_dim": Setting(
            None,
            "Head size of q/k/v (transformers' head_dim); None = hidden_size / heads.",
            optional(positive_int),
        ),
        "attention_bias": Setting(
            False,
            "Biases on the q, k, v and o projections (transformers' attention_bias).",
            boolean,
        ),
    },
    per_layer=("num_key_value_heads",),
    validate=_check_attention,
    tiny={"num_key_value_heads": 2},
    kv_sharing=True,
)

# TNL's lightning attention and cosFormer2 share one layer and so one settings table.
_LINEAR_ATTENTION_SETTINGS = {
    "lightning_decay": Setting(
        "alibi",
        'TNL decay: "alibi" (released TransNormerLLM code) or "paper" (TNL paper Eq. 10).',
        one_of("alibi", "paper"),
    ),
    "lightning_chunk_size": Setting(64, "Chunk length of the chunked form.", positive_int),
    "output_gate_rank": Setting(
        None,
        "Rank t of the low-rank sigmoid output gate; None = head dim (arXiv 2406.16690 A.1.2).",
        optional(positive_int),
    ),
    "output_gate": Setting(
        "low_rank_sigmoid",
        'Output gate: "low_rank_sigmoid" (σ(x W_down W_up), arXiv 2406.16690) or "linear" (x W_u, '
        "full rank, no activation: the released TransNormerLLM).",
        one_of("low_rank_sigmoid", "linear"),
    ),
}
register_mixer(
    "lightning",
    "zoo.layers.lightning:LightningAttention",
    cache="linear_attention",
    display_name="TNL lightning attention",
    doc="Lightning attention with a fixed per-head decay and a low-rank output gate (TNL).",
    settings={
        **_LINEAR_ATTENTION_SETTINGS,
        "lightning_lrpe": Setting(
            False,
            "LRPE with θ learned per head and channel on q and k (the released TransNormerLLM's "
            "first layer; key width 2·head dim).",
            boolean,
        ),
    },
    per_layer=("lightning_lrpe",),
    tiny={"lightning_chunk_size": 8},
)


def _check_hgrn2(config: Any) -> None:
    ratio = config.hgrn2_expand_ratio
    if config.hidden_size % ratio:
        raise ValueError(
            f"hgrn2_expand_ratio={ratio} does not divide hidden_size={config.hidden_size}"
        )


def _zeros(param: Any) -> None:
    from transformers import initialization as init

    init.zeros_(param)


register_mixer(
    "hgrn2",
    "zoo.layers.hgrn2:HGRN2Attention",
    cache="linear_attention",
    display_name="HGRN2",
    doc="Gated linear RNN with outer-product state expansion (HGRN2, arXiv 2404.07904).",
    settings={
        "hgrn2_expand_ratio": Setting(
            None,
            "Forget/query dim e of each head (state expansion); heads = hidden_size / e. "
            "None = the head dim hidden_size / num_attention_heads (128 at the named sizes).",
            positive_int,
            derive=lambda c: c.hidden_size // c.num_attention_heads,
        ),
        "hgrn2_chunk_size": Setting(64, "Chunk length of the chunked gated scan.", positive_int),
        "hgrn2_q_scale": Setting(
            "none",
            'Scale of q before the recurrence: "none" (the output norm absorbs it) or '
            '"rsqrt_dim" (q / sqrt(e), as fla\'s HGRN2 does).',
            one_of("none", "rsqrt_dim"),
        ),
        "hgrn2_output_norm": Setting(
            "config",
            'Norm before o_proj: "config" (config.norm_type), "rmsnorm" (with gain, as fla) '
            'or "srmsnorm" (gain-free).',
            one_of("config", "rmsnorm", "srmsnorm"),
        ),
        "hgrn2_output_norm_eps": Setting(
            None,
            "Epsilon of the norm before o_proj; None = rms_norm_eps (fla's HGRN2: 1e-5).",
            optional(positive_number),
        ),
    },
    per_layer=("hgrn2_expand_ratio",),
    validate=_check_hgrn2,
    model_parameters={
        "hgrn2_lower_bounds": ModelParameter(
            shape=lambda c: (c.num_hidden_layers, c.hidden_size),
            init=_zeros,
            doc="Γ (L, d): the forget gates' lower bounds, shared through a softmax over depth.",
        )
    },
    tiny={"hgrn2_expand_ratio": 16, "hgrn2_chunk_size": 8},
)


def _check_gla(config: Any) -> None:
    heads = config.num_attention_heads
    for name in ("gla_expand_k", "gla_expand_v"):
        width = config.hidden_size * getattr(config, name)
        if width != round(width) or round(width) % heads:
            raise ValueError(
                f"{name}={getattr(config, name)} makes a width of {width} at hidden_size="
                f"{config.hidden_size}: it must be a whole multiple of num_attention_heads={heads}"
            )


register_mixer(
    "gla",
    "zoo.layers.gla:GatedLinearAttention",
    cache="linear_attention",
    display_name="GLA",
    doc="Gated linear attention: per-key-channel data-dependent decay (arXiv 2312.06635).",
    settings={
        "gla_expand_k": Setting(0.5, "Key width / hidden_size (fla's expand_k).", positive_number),
        "gla_expand_v": Setting(
            1.0, "Value width / hidden_size (fla's expand_v).", positive_number
        ),
        "gla_gate_low_rank_dim": Setting(
            16, "Rank of the forget gate's projection (fla's gate_low_rank_dim).", positive_int
        ),
        "gla_gate_logit_normalizer": Setting(
            16.0,
            "τ in log α = logsigmoid(gate logits) / τ (fla's gate_logit_normalizer).",
            positive_number,
        ),
        "gla_chunk_size": Setting(64, "Chunk length of the chunked gated scan.", positive_int),
        "gla_norm_eps": Setting(
            None,
            "Epsilon of the per-head norm before the output gate; None = rms_norm_eps "
            "(as fla's GLA model passes its norm_eps to the layer).",
            optional(positive_number),
        ),
    },
    validate=_check_gla,
    tiny={"gla_chunk_size": 8},
)
register_mixer(
    "cosformer2",
    "zoo.layers.cosformer2:CosFormer2Attention",
    cache="linear_attention",
    display_name="cosFormer2",
    doc="Linear attention without decay, re-weighted by LRPE (arXiv 2406.16690 §2.2).",
    settings=_LINEAR_ATTENTION_SETTINGS,
    tiny={"lightning_chunk_size": 8},
)


def _check_mamba(config: Any) -> None:
    if not 0 < config.mamba_dt_min <= config.mamba_dt_max:
        raise ValueError(
            f"mamba_dt_min={config.mamba_dt_min} and mamba_dt_max={config.mamba_dt_max} must "
            "satisfy 0 < mamba_dt_min <= mamba_dt_max"
        )


register_mixer(
    "mamba",
    "zoo.layers.mamba:MambaMixer",
    cache="linear_attention",  # conv state + SSM state
    display_name="Mamba",
    doc="Gated, causal-conv'd selective SSM: the whole Mamba block (arXiv 2312.00752).",
    settings={
        "mamba_d_state": Setting(16, "SSM state size N per channel.", positive_int),
        "mamba_d_conv": Setting(4, "Kernel width of the causal depthwise conv.", positive_int),
        "mamba_expand": Setting(2, "Inner width D_in = expand · hidden_size.", positive_int),
        "mamba_dt_rank": Setting(
            None,
            "Rank R of the Δ projection; None = ceil(hidden_size / 16).",
            optional(positive_int),
        ),
        "mamba_dt_min": Setting(1e-3, "Lower end of the initial Δ's range.", finite_number),
        "mamba_dt_max": Setting(0.1, "Upper end of the initial Δ's range.", finite_number),
        "mamba_dt_init_floor": Setting(1e-4, "Floor of the initial Δ.", non_negative_number),
        "mamba_conv_bias": Setting(True, "Bias on the depthwise conv (on in the paper).", boolean),
        "mamba_proj_bias": Setting(False, "Bias on in_proj and out_proj (off).", boolean),
        "mamba_chunk_size": Setting(
            64, "Chunk length of the chunked selective scan.", positive_int
        ),
    },
    per_layer=("mamba_d_state", "mamba_expand"),
    validate=_check_mamba,
    tiny={"mamba_d_state": 4, "mamba_chunk_size": 8},
)


def _check_mamba2(config: Any) -> None:
    d_inner = config.mamba2_expand * config.hidden_size
    if d_inner % config.mamba2_head_dim:
        raise ValueError(
            f"mamba2_head_dim={config.mamba2_head_dim} does not divide the inner width "
            f"mamba2_expand * hidden_size = {d_inner}"
        )
    heads = d_inner // config.mamba2_head_dim
    if heads % config.mamba2_n_groups:
        raise ValueError(
            f"mamba2_n_groups={config.mamba2_n_groups} does not divide the {heads} heads "
            f"(mamba2_expand * hidden_size / mamba2_head_dim)"
        )
    if not 0 < config.mamba2_dt_min <= config.mamba2_dt_max:
        raise ValueError(
            f"mamba2_dt_min={config.mamba2_dt_min} and mamba2_dt_max={config.mamba2_dt_max} "
            "must satisfy 0 < mamba2_dt_min <= mamba2_dt_max"
        )


def _dt_limit(value: Any) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(_is_number(v) for v in value)
        or not 0 <= value[0] < value[1]
    ):
        return "is not None or a pair [low, high] with 0 <= low < high"
    return None


register_mixer(
    "mamba2",
    "zoo.layers.mamba2:Mamba2Mixer",
    cache="linear_attention",  # conv state + SSD state
    display_name="Mamba2",
    doc="Mamba2's SSD layer: scalar per-head decay, multi-head N × P states, gated RMSNorm "
    "(arXiv 2405.21060).",
    settings={
        "mamba2_expand": Setting(2, "Inner width D_in = expand · hidden_size.", positive_int),
        "mamba2_head_dim": Setting(
            None,
            "Head size P; heads = D_in / P. None = 64 (the released models'), or the largest "
            "power of two dividing D_in where 64 does not.",
            positive_int,
            derive=lambda c: math.gcd(64, c.mamba2_expand * c.hidden_size),
        ),
        "mamba2_d_state": Setting(128, "State size N per head.", positive_int),
        "mamba2_n_groups": Setting(
            1, "Groups G of heads sharing B and C (and the gated norm's groups).", positive_int
        ),
        "mamba2_d_conv": Setting(4, "Kernel width of the causal depthwise conv.", positive_int),
        "mamba2_conv_bias": Setting(True, "Bias on the depthwise conv.", boolean),
        "mamba2_proj_bias": Setting(False, "Bias on in_proj and out_proj.", boolean),
        "mamba2_dt_min": Setting(1e-3, "Lower end of the initial Δ's range.", finite_number),
        "mamba2_dt_max": Setting(0.1, "Upper end of the initial Δ's range.", finite_number),
        "mamba2_dt_init_floor": Setting(1e-4, "Floor of the initial Δ.", non_negative_number),
        "mamba2_dt_limit": Setting(
            None,
            "Clamp of Δ after the softplus, [low, high] (transformers' time_step_limit); None = "
            "no clamp.",
            _dt_limit,
        ),
        "mamba2_chunk_size": Setting(64, "Chunk length of the chunked SSD.", positive_int),
        "mamba2_norm_eps": Setting(
            None,
            "Epsilon of the gated RMSNorm before out_proj; None = rms_norm_eps.",
            optional(positive_number),
        ),
    },
    per_layer=("mamba2_d_state", "mamba2_expand"),
    validate=_check_mamba2,
    tiny={"mamba2_head_dim": 8, "mamba2_d_state": 4, "mamba2_n_groups": 2, "mamba2_chunk_size": 8},
)


def _check_gdn(config: Any) -> None:
    heads, v_heads = config.gdn_num_heads, config.gdn_num_v_heads
    if v_heads % heads:
        raise ValueError(
            f"gdn_num_heads={heads} does not divide gdn_num_v_heads={v_heads} (each key head "
            "serves a whole group of value heads)"
        )
    v_dim = config.gdn_head_dim * config.gdn_expand_v
    if v_dim != round(v_dim):
        raise ValueError(
            f"gdn_expand_v={config.gdn_expand_v} times gdn_head_dim={config.gdn_head_dim} is "
            f"{v_dim}, not a whole value head size"
        )


register_mixer(
    "gated_deltanet",
    "zoo.layers.gated_deltanet:GatedDeltaNet",
    cache="linear_attention",  # conv state + delta-rule state
    display_name="Gated DeltaNet",
    doc="Delta rule with a per-head data-dependent decay, short convs, L2-normalised q/k and "
    "an output gate (arXiv 2412.06464; Qwen3-Next's linear layers).",
    settings={
        "gdn_num_heads": Setting(
            None,
            "Query/key heads; None = num_attention_heads.",
            positive_int,
            derive=lambda c: c.num_attention_heads,
        ),
        "gdn_num_v_heads": Setting(
            None,
            "Value heads, a multiple of the key heads (fla's num_v_heads); None = the key heads.",
            positive_int,
            derive=lambda c: c.gdn_num_heads or c.num_attention_heads,
        ),
        "gdn_head_dim": Setting(
            None,
            "Key head size d_k (fla's head_dim); None = hidden_size / the key heads, the model's "
            "head size (Qwen3-Next: 128).",
            positive_int,
            derive=lambda c: max(1, c.hidden_size // (c.gdn_num_heads or c.num_attention_heads)),
        ),
        "gdn_expand_v": Setting(
            2.0, "Value head size / key head size (fla's expand_v).", positive_number
        ),
        "gdn_conv_size": Setting(4, "Kernel width of the short convs on q, k, v.", positive_int),
        "gdn_conv_bias": Setting(False, "Biases on the short convs.", boolean),
        "gdn_chunk_size": Setting(64, "Chunk length of the chunked delta rule.", positive_int),
        "gdn_norm_eps": Setting(
            None,
            "Epsilon of the per-head norm before the output gate; None = rms_norm_eps.",
            optional(positive_number),
        ),
    },
    per_layer=("gdn_num_v_heads",),
    validate=_check_gdn,
    tiny={"gdn_head_dim": 8, "gdn_num_heads": 2, "gdn_chunk_size": 8},
)
register_mixer(
    "hyena",
    "zoo.layers.hyena:HyenaOperator",
    # The long convolution needs the whole input history to decode: it grows like a KV cache.
    cache="full_attention",
    display_name="Hyena",
    doc="Order-N Hyena operator: implicit long convolutions and gates (arXiv 2302.10866); its "
    "filters span max_position_embeddings positions (safari's l_max).",
    settings={
        "hyena_order": Setting(2, "Order N (N − 1 long convolutions; >= 2).", int_at_least(2)),
        "hyena_filter_order": Setting(64, "Width of the implicit filter FFN.", positive_int),
        "hyena_short_filter": Setting(
            3, "Kernel width of the short depthwise conv on the projections.", positive_int
        ),
        "hyena_emb_dim": Setting(
            33,
            "Positional-encoding features of the implicit filter (odd, >= 3).",
            odd_int_at_least(3),
        ),
        "hyena_num_inner_mlps": Setting(2, "Hidden Sin layers of the filter FFN.", positive_int),
        "hyena_modulate": Setting(
            True, "Multiply the filters by the exponential decay window.", boolean
        ),
        "hyena_modulation_shift": Setting(
            0.0, "Constant added to the decay window (safari's shift).", finite_number
        ),
        "hyena_decay_target": Setting(
            1e-2, "Window value the decays reach (safari's target).", positive_number
        ),
        "hyena_fast_decay_pct": Setting(
            0.3,
            "Fraction of L_max where the fastest channel reaches the target (fast_decay_pct).",
            positive_number,
        ),
        "hyena_slow_decay_pct": Setting(
            1.5,
            "Fraction of L_max where the slowest channel reaches the target (slow_decay_pct).",
            positive_number,
        ),
        "hyena_normalized": Setting(
            False,
            "Divide each filter position by its L1 norm over the channels (safari's normalized).",
            boolean,
        ),
        "hyena_filter_bias": Setting(
            True, "The skip term b ⊙ v of each long convolution (safari's filter bias).", boolean
        ),
        "hyena_learned_pos_emb": Setting(
            False,
            "Hold the filters' positional features as a parameter (safari trains them at "
            "lr_pos_emb) instead of recomputing them.",
            boolean,
        ),
    },
    per_layer=("hyena_order",),
    tiny={"hyena_filter_order": 16, "max_position_embeddings": 256},
)
register_mixer(
    "gated_conv",
    "zoo.layers.gated_conv:GatedShortConv",
    cache="linear_attention",  # conv state only
    display_name="gated short conv",
    doc="Double-gated short convolution: STAR's GConv-1, LFM2's conv block.",
    settings={
        "gated_conv_kernel": Setting(3, "Kernel width of the causal depthwise conv.", positive_int)
    },
    per_layer=("gated_conv_kernel",),
)


def _check_moe(config: Any) -> None:
    if config.num_experts_per_tok > config.num_experts:
        raise ValueError(
            f"num_experts_per_tok={config.num_experts_per_tok} must be <= "
            f"num_experts={config.num_experts}: a token cannot visit more experts than exist"
        )


register_channel_mixer(
    "swiglu",
    "zoo.layers.glu:SwiGLU",
    display_name="SwiGLU",
    doc="LLaMA's SwiGLU MLP of width intermediate_size.",
    settings={
        "mlp_bias": Setting(
            False, "Biases on gate, up and down projections (transformers' mlp_bias).", boolean
        )
    },
    per_layer=("intermediate_size",),
)
register_channel_mixer(
    "glu",
    "zoo.layers.glu:GLU",
    display_name="GLU",
    doc="TNL's activation-free GLU of width intermediate_size.",
    per_layer=("intermediate_size",),
)
register_channel_mixer(
    "gelu_mlp",
    "zoo.layers.mlp:GeluMLP",
    display_name="GELU MLP",
    doc="GPT-2's two-layer GELU MLP with biases, of width intermediate_size (safari's Hyena LMs).",
    settings={
        "gelu_mlp_approximate": Setting(
            "tanh",
            "GELU form: 'tanh' (GPT-2's and safari's approximation) or 'none' (exact erf).",
            one_of("tanh", "none"),
        )
    },
    per_layer=("intermediate_size",),
)
register_channel_mixer(
    "moe",
    "zoo.layers.moe:MoE",
    display_name="MoE",
    doc="Top-k routed SwiGLU experts, optionally with shared experts (names as transformers').",
    settings={
        "num_experts": Setting(8, "Routed experts E per MoE layer.", positive_int),
        "num_experts_per_tok": Setting(
            2, "Experts k each token visits; sparsity = 1 − k/E (arXiv 2501.12370).", positive_int
        ),
        "moe_intermediate_size": Setting(
            None,
            "Width of one SwiGLU expert; None = intermediate_size (smaller and more experts is "
            "DeepSeekMoE's fine-grained segmentation).",
            positive_int,
            derive=lambda c: c.intermediate_size,
        ),
        "num_shared_experts": Setting(
            0,
            "Always-on shared experts (DeepSeekMoE), one SwiGLU of width num_shared_experts · "
            "moe_intermediate_size; 0 = none (Mixtral, OLMoE).",
            lambda v: None if _is_int(v) and v >= 0 else "must be an integer >= 0",
        ),
        "router_scoring_func": Setting(
            "softmax",
            'Router scores: "softmax" over experts (Mixtral) or per-expert "sigmoid"'
            " (DeepSeek-V3).",
            one_of("softmax", "sigmoid"),
        ),
        "norm_topk_prob": Setting(
            True, "Rescale the k selected scores to sum to 1 (Mixtral: yes; OLMoE: no).", boolean
        ),
        "router_aux_loss_coef": Setting(
            0.01, "Weight of the Switch load-balancing loss (0 turns it off).", non_negative_number
        ),
        "router_z_loss_coef": Setting(
            0.001, "Weight of the router z-loss (ST-MoE, arXiv 2202.08906).", non_negative_number
        ),
        "moe_capacity_factor": Setting(
            None,
            "Capacity factor c: an expert takes at most ceil(c · tokens · k / E) tokens per call "
            "and drops the rest; None = dropless.",
            lambda v: (
                None
                if v is None or (_is_number(v) and v > 0)
                else "must be a positive number, or None for dropless routing"
            ),
        ),
        "moe_backend": Setting(
            "auto",
            'Experts implementation: "auto", "torch", "torch_grouped_mm", "triton", "megablocks".',
            one_of("auto", "torch", "torch_grouped_mm", "triton", "megablocks"),
        ),
        "output_router_logits": Setting(
            False, "Return every MoE layer's router logits in the output.", boolean
        ),
    },
    per_layer=("moe_intermediate_size",),
    validate=_check_moe,
    routed=True,
)
register_channel_mixer("none", None, display_name="none", doc="No channel mixer (Mamba blocks).")


# -- the zoo's own families ---------------------------------------------------------------------


def _demo_mamba(shared: dict[str, Any]) -> dict[str, Any]:
    # No channel mixer: two Mamba blocks hold about one Transformer layer's parameters.
    return {"num_hidden_layers": 2 * shared["num_hidden_layers"]}


def _demo_hybrid(shared: dict[str, Any]) -> dict[str, Any]:
    # MAD's best stripes: TNL blocks, then one attention block (25% attention at 4 layers), every
    # channel mixer a MoE layer of top-2 of 4 experts of half the dense width: the active
    # channel-mixer compute of one dense SwiGLU (iso-active), twice its parameters.
    n, d = shared["num_hidden_layers"], shared["hidden_size"]
    dense_width = math.ceil(8 * d / 3 / 256) * 256  # the backbone's default intermediate_size
    return {
        "mixers": ["lightning"] * (n - 1) + ["attention"],
        "channel_mixers": ["moe"] * n,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": dense_width // 2,
    }


register_family("llama", "zoo.configuration:LlamaConfig", display_name="LLaMA", card_vocab=100_280)
register_family("tnl", "zoo.configuration:TNLConfig", display_name="TNL", card_vocab=100_280)
register_family("hgrn2", "zoo.configuration:HGRN2Config", display_name="HGRN2", card_vocab=100_280)
register_family("gla", "zoo.configuration:GLAConfig", display_name="GLA", card_vocab=32_000)
register_family(
    "cosformer2", "zoo.configuration:CosFormer2Config", display_name="cosFormer2",
    card_vocab=100_280,
)  # fmt: skip
register_family(
    "mamba", "zoo.configuration:MambaConfig", display_name="Mamba", card_vocab=50_280,
    demo=_demo_mamba,
)  # fmt: skip
register_family(
    "mamba2", "zoo.configuration:Mamba2Config", display_name="Mamba2", card_vocab=50_280,
    demo=_demo_mamba,
)  # fmt: skip
register_family(
    "gated_deltanet", "zoo.configuration:GatedDeltaNetConfig", display_name="Gated DeltaNet",
    card_vocab=32_000,
)  # fmt: skip
register_family("hyena", "zoo.configuration:HyenaConfig", display_name="Hyena", card_vocab=50_264)
register_family(
    "hybrid",
    "zoo.configuration:HybridConfig",
    display_name="striped hybrid",
    card_vocab=50_280,
    # Striped: a KV cache and two kinds of recurrent state in one cache, MoE and dense channel
    # mixers (4 experts, top-2, one shared expert).
    tiny={
        "mixers": ["lightning", "attention", "mamba"],
        "channel_mixers": ["moe", "swiglu", "moe"],
        "num_experts": 4,
        "moe_intermediate_size": 32,
        "num_shared_experts": 1,
    },
    demo=_demo_hybrid,
)
