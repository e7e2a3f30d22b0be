"""Configs of the zoo: one backbone config (`ZooConfig`) and one preset per family.

A model is a stack of blocks, each a pre-norm sequence mixer and a pre-norm channel mixer with
residuals. `mixers` and `channel_mixers` name the operator of every layer, so a striped hybrid is
just a pattern that reads in config.json. A preset (`LlamaConfig`, `TNLConfig`) fills those
lists and its family's defaults when they are not given, and knows the named sizes of the
linear-complexity scaling-law paper (Shen et al., arXiv 2406.16690, Tables 2 and 7).

Every field is validated on construction; a bad value raises `ValueError` naming the field, the
value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import PreTrainedConfig

from zoo import registry

NORM_TYPES: tuple[str, ...] = ("rmsnorm", "srmsnorm", "layernorm")
KERNEL_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

# The byte tokenizer's ids (zoo/tokenizer.py): 256 bytes, then <s>, </s>, <pad>.
_BYTE_VOCAB, _BOS, _EOS, _PAD = 259, 256, 257, 258


def default_intermediate_size(hidden_size: int) -> int:
    """The channel-mixer width g when none is given: 8d/3 rounded up to a multiple of 256."""
    return _round_up(8 * hidden_size / 3, 256)


@dataclass(frozen=True)
class NamedSize:
    """One named size: a row of the scaling-law paper's table (arXiv 2406.16690, Tables 2 and 7)
    or, with `num_experts`, a MoE size whose every channel mixer is a MoE layer."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_experts: int = 0
    num_experts_per_tok: int = 0
    # Width of one expert; None = intermediate_size (Mixtral: experts as wide as the dense MLP).
    moe_intermediate_size: int | None = None
    # Layer pattern (see `parse_layer_pattern`) of a hybrid size; None = the family's default.
    pattern: str | None = None
    # Config fields of a released model's variant (its settings, vocabulary, ...); applied after
    # the row's shape, before the caller's overrides.
    settings: dict[str, Any] | None = None
    # The Hub id of the released weights this size converts from (`zoo convert ID DIR`).
    released: str | None = None


_GROUP = re.compile(r"\(([^()]*)\)\s*\*\s*(\d+)")
_LAYER = re.compile(r"^([a-z0-9_]+)(?::([a-z0-9_]+))?(?:\*(\d+))?$")
# More layers than any model of the zoo's papers by far; a pattern beyond it is a typo, and
# expanding it would hang (`attention*1000000`).
MAX_LAYERS = 4096


def parse_layer_pattern(pattern: str) -> tuple[list[str], list[str]]:
    """Per-layer (mixers, channel_mixers) of a compact pattern.

    A layer is `mixer:channel_mixer` (`attention:moe`); `:channel_mixer` defaults to `swiglu`.
    `layer*N` repeats one layer, `(layers)*N` a group; layers are separated by spaces or commas.
    `"(lightning:moe*3 attention:moe)*2"` is 8 layers: three TNL blocks, then one attention
    block, twice, every channel mixer a MoE layer.
    """

    def too_many(count: int) -> ValueError:
        return ValueError(
            f"pattern {pattern!r} asks for {count:,} layers; at most {MAX_LAYERS} are allowed"
        )

    text = pattern
    while match := _GROUP.search(text):
        if int(match.group(2)) > MAX_LAYERS:
            raise too_many(int(match.group(2)))
        text = (
            f"{text[: match.start()]} {' '.join([match.group(1)] * int(match.group(2)))} "
            + (text[match.end() :])
        )
    if "(" in text or ")" in text:
        raise ValueError(f"pattern {pattern!r}: unbalanced or unrepeated group; write (...)*N")
    mixers: list[str] = []
    channel_mixers: list[str] = []
    for token in re.split(r"[\s,]+", text.strip()):
        if not token:
            continue
        match = _LAYER.match(token)
        if match is None:
            raise ValueError(
                f"pattern {pattern!r}: cannot read layer {token!r}; write mixer:channel_mixer"
            )
        mixer, channel, repeat = match.group(1), match.group(2) or "swiglu", match.group(3)
        if mixer not in registry.sequence_mixers():
            raise ValueError(
                f"pattern {pattern!r}: {mixer!r} is not a sequence mixer; "
                f"allowed: {sorted(registry.sequence_mixers())}"
            )
        if channel not in registry.channel_mixers():
            raise ValueError(
                f"pattern {pattern!r}: {channel!r} is not a channel mixer; "
                f"allowed: {list(registry.channel_mixers())}"
            )
        count = int(repeat) if repeat else 1
        if len(mixers) + count > MAX_LAYERS:
            raise too_many(len(mixers) + count)
        mixers += [mixer] * count
        channel_mixers += [channel] * count
    if not mixers:
        raise ValueError(f"pattern {pattern!r} has no layers")
    return mixers, channel_mixers


def format_layer_pattern(mixers: list[str], channel_mixers: list[str]) -> str:
    """The compact pattern of per-layer lists (runs of equal layers written `layer*N`)."""
    layers = [f"{m}:{c}" for m, c in zip(mixers, channel_mixers, strict=True)]
    parts: list[str] = []
    i = 0
    while i < len(layers):
        j = i
        while j < len(layers) and layers[j] == layers[i]:
            j += 1
        parts.append(layers[i] if j - i == 1 else f"{layers[i]}*{j - i}")
        i = j
    return " ".join(parts)


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


class ZooConfig(PreTrainedConfig):
    """The backbone config shared by every family and hybrid.

    Use a family preset (`LlamaConfig`, `TNLConfig`, ...) unless you are writing a hybrid by
    hand; the base class has no default mixer and needs `mixers` and `channel_mixers`.

    The fields below are the backbone's. Every registered mixer adds its own settings as further
    keys (`mamba_d_state`, `num_experts`, ...: `zoo.registry`, or `zoo describe --list`);
    each config carries all of them, with their defaults unless given.
    """

    model_type = "zoo"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache"]
    # Family defaults, overridden by the presets.
    default_mixer: ClassVar[str | None] = None
    default_channel_mixer: ClassVar[str | None] = None
    named_sizes: ClassVar[dict[str, NamedSize]] = {}
    # A preset's own defaults for mixer settings (keys of `zoo.registry.all_settings()`).
    setting_defaults: ClassVar[dict[str, Any]] = {}

    # Vocabulary size; the default is the embedded byte tokenizer's (256 bytes + 3 specials).
    vocab_size: int = _BYTE_VOCAB
    # Model width d.
    hidden_size: int = 256
    # Number of blocks l.
    num_hidden_layers: int = 4
    # Sequence mixer per layer (see zoo.registry); None repeats the family's default.
    mixers: list[str] | None = None
    # Channel mixer per layer (see zoo.registry); None repeats the family's default.
    channel_mixers: list[str] | None = None
    # Heads of the attention and linear-attention mixers; head dim = hidden_size / heads.
    num_attention_heads: int = 4
    # Channel-mixer width g; None = 8d/3 rounded up to a multiple of 256 (the paper's rule).
    intermediate_size: int | None = None
    # Norm of the blocks and the final norm: "rmsnorm" (with gain), "srmsnorm" (no gain) or
    # "layernorm" (gain and bias; safari's Hyena).
    norm_type: str = "rmsnorm"
    # Epsilon of every norm (a mixer's own output norm may set its own).
    rms_norm_eps: float = 1e-6
    # Longest context the model was trained for; Hyena's implicit filters span exactly this many
    # positions (safari's l_max), every other mixer takes it as information only.
    max_position_embeddings: int = 8192
    # Per-layer settings: one dict per layer (or None) of fields that replace the model's value in
    # that layer only, e.g. {"num_key_value_heads": 1}; each mixer names the fields it allows.
    layer_overrides: list[dict[str, Any] | None] | None = None
    # Weight sharing across layers (STAR's featurizer sharing): per layer, the index of an earlier
    # layer whose sequence-mixer weights this layer uses (tied parameters, saved once), or None.
    mixer_weight_source: list[int | None] | None = None
    # The same for the channel mixers.
    channel_mixer_weight_source: list[int | None] | None = None
    # Cross-layer K/V sharing (STAR's feature-group sharing; Brandon et al., arXiv 2405.12981):
    # per layer, an earlier attention layer whose keys and values this attention layer reads
    # instead of computing and caching its own, or None.
    kv_source: list[int | None] | None = None
    # Kernel backend of the mixer ops: "auto" (Triton on CUDA when built, torch otherwise).
    kernel_backend: str = "auto"
    # Std of the normal init of every Linear and Embedding (TNL/HGRN2 code and LLaMA use 0.02).
    initializer_range: float = 0.02
    # Factor on the token embeddings before the first block (the released TransNormerLLM's √d;
    # 1 everywhere else). Embeddings passed as inputs_embeds are taken as they are.
    embedding_multiplier: float = 1.0
    # Share the input embedding and the LM head.
    tie_word_embeddings: bool = True
    # Return the cache from forward (used by generate).
    use_cache: bool = True
    pad_token_id: int | None = _PAD
    bos_token_id: int | None = _BOS
    eos_token_id: int | list[int] | None = _EOS
    # Cache layer type per layer, derived from `mixers` (read by transformers' DynamicCache).
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # Mixers registered outside the zoo, by name, with the module of their layer (kept in
        # config.json, so that loading without them says what to import).
        recorded = dict(kwargs.pop("mixer_modules", None) or {})
        for key, setting in registry.all_settings().items():
            default = self.setting_defaults.get(key, setting.default)
            setattr(self, key, kwargs.pop(key) if key in kwargs else default)
        self._fill_defaults(recorded)
        self._validate()
        self.layer_types = [registry.sequence_mixer(m).cache for m in self.mixers]
        modules = {
            entry.name: entry.module
            for entry in self._layer_entries()
            if not entry.module.startswith("zoo.")
        }
        if modules:
            self.mixer_modules = modules
        super().__post_init__(**kwargs)

    @classmethod
    def field_names(cls) -> set[str]:
        """Every key a config of this class takes: the backbone's and every mixer setting."""
        return {f.name for f in dataclasses.fields(cls)} | set(registry.all_settings())

    def _layer_entries(self) -> list[registry.SequenceMixer | registry.ChannelMixer]:
        """The registry entries of the mixers this config stacks, each once."""
        entries = {m: registry.sequence_mixer(m) for m in self.mixers}
        entries.update({c: registry.channel_mixer(c) for c in self.channel_mixers})
        return list(entries.values())

    def _fill_defaults(self, mixer_modules: dict[str, str] | None = None) -> None:
        n = self.num_hidden_layers
        if isinstance(n, int) and n > 0:
            if self.mixers is None:
                if self.default_mixer is None:
                    raise ValueError(
                        f"{type(self).__name__} has no default mixer: pass mixers=[...] with one "
                        f"of {sorted(registry.sequence_mixers())} per layer, or use a family "
                        "preset"
                    )
                self.mixers = [self.default_mixer] * n
            if self.channel_mixers is None:
                if self.default_channel_mixer is None:
                    raise ValueError(
                        f"{type(self).__name__} has no default channel mixer: pass "
                        f"channel_mixers=[...] with one of {list(registry.channel_mixers())} per "
                        "layer"
                    )
                self.channel_mixers = [self.default_channel_mixer] * n
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            self.intermediate_size = default_intermediate_size(self.hidden_size)
        self._validate_backbone(mixer_modules or {})
        # Derived defaults only for the mixers in use: another mixer's derived setting stays None
        # rather than follow fields it does not depend on here.
        for entry in self._layer_entries():
            for key, setting in entry.settings.items():
                if getattr(self, key) is None and setting.derive is not None:
                    setattr(self, key, setting.derive(self))

    def _validate(self) -> None:
        self._validate_fields()
        self._validate_layers()

    def _validate_backbone(self, mixer_modules: dict[str, str] | None = None) -> None:
        """The backbone fields (before mixer settings are derived from them); `mixer_modules`
        (from a saved config) names the module of a mixer that is not registered here."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("rms_norm_eps", "initializer_range", "embedding_multiplier"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"{name}={value!r} must be positive")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} does not divide "
                f"hidden_size={self.hidden_size}"
            )
        for name, known in (
            ("mixers", registry.sequence_mixers()),
            ("channel_mixers", registry.channel_mixers()),
        ):
            layers = getattr(self, name)
            if not isinstance(layers, (list, tuple)):
                raise ValueError(f"{name}={layers!r} must be a list with one name per layer")
            if len(layers) != self.num_hidden_layers:
                raise ValueError(
                    f"{name} has {len(layers)} entries but "
                    f"num_hidden_layers={self.num_hidden_layers}"
                )
            for i, mixer in enumerate(layers):
                if mixer not in known:
                    hint = ""
                    if mixer in (mixer_modules or {}):
                        hint = (
                            f"; it was registered by module {mixer_modules[mixer]!r}: "
                            "import that module before loading"
                        )
                    raise ValueError(
                        f"{name}[{i}]={mixer!r} is not a known mixer; allowed: "
                        f"{sorted(known)}{hint}"
                    )
        for name, allowed in (("norm_type", NORM_TYPES), ("kernel_backend", KERNEL_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size={self.vocab_size} must be at least 2")

    def _validate_fields(self) -> None:
        """The backbone and every mixer setting's own check; then each mixer in use checks the
        settings it combines with the backbone (a ratio that must divide the width, ...)."""
        self._validate_backbone()
        for key, setting in registry.all_settings().items():
            if getattr(self, key) is None and setting.derive is not None:
                continue  # a derived setting of a mixer this model does not use
            complaint = setting.check(getattr(self, key)) if setting.check else None
            if complaint:
                raise ValueError(f"{key}={getattr(self, key)!r} {complaint}")
        for entry in self._layer_entries():
            if entry.validate is not None:
                entry.validate(self)

    def _validate_layers(self) -> None:
        """Per-layer overrides and cross-layer sharing: every reference must be buildable."""
        n = self.num_hidden_layers
        for name in (
            "layer_overrides",
            "mixer_weight_source",
            "channel_mixer_weight_source",
            "kv_source",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != n):
                raise ValueError(
                    f"{name} must be None or a list with one entry per layer "
                    f"(num_hidden_layers={n}), got {value!r}"
                )
        for i, overrides in enumerate(self.layer_overrides or []):
            if overrides is None:
                continue
            if not isinstance(overrides, dict):
                raise ValueError(f"layer_overrides[{i}]={overrides!r} must be a dict or None")
            allowed = self._per_layer_fields(i)
            for key in overrides:
                if key not in allowed:
                    raise ValueError(
                        f"layer_overrides[{i}].{key}: not a per-layer field of layer {i} "
                        f"({self.mixers[i]}:{self.channel_mixers[i]}); allowed: {list(allowed)}"
                    )
            try:
                self.for_layer(i)._validate_fields()
            except ValueError as error:
                raise ValueError(f"layer_overrides[{i}]: {error}") from None
        kinds = (
            ("mixer_weight_source", self.mixers),
            ("channel_mixer_weight_source", self.channel_mixers),
            ("kv_source", self.mixers),
        )
        for name, layers in kinds:
            sources = getattr(self, name) or [None] * n
            for i, j in enumerate(sources):
                if j is None:
                    continue
                where = f"{name}[{i}]={j!r}"
                if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < i:
                    raise ValueError(f"{where} must be None or an earlier layer index (0..{i - 1})")
                if sources[j] is not None:
                    raise ValueError(
                        f"{where}: layer {j} takes its own from layer {sources[j]}; "
                        f"name that layer instead"
                    )
                if layers[i] != layers[j]:
                    raise ValueError(
                        f"{where}: layer {i} is {layers[i]!r}, layer {j} {layers[j]!r}"
                    )
                if name == "channel_mixer_weight_source" and (
                    registry.channel_mixer(layers[i]).layer is None
                ):
                    raise ValueError(f"{where}: layer {i} has no channel mixer to share")
                if name == "kv_source" and not registry.sequence_mixer(layers[i]).kv_sharing:
                    raise ValueError(
                        f"{where}: layer {i} is {layers[i]!r}; only layers that can read another "
                        "layer's keys and values (softmax attention) can share K/V"
                    )
                mine, theirs = self.for_layer(i), self.for_layer(j)
                if name == "kv_source":
                    if mine.num_key_value_heads != theirs.num_key_value_heads:
                        raise ValueError(
                            f"{where}: layer {i} has {mine.num_key_value_heads} K/V heads, "
                            f"layer {j} {theirs.num_key_value_heads}"
                        )
                elif self._part_overrides(i, name) != self._part_overrides(j, name):
                    raise ValueError(
                        f"{where}: layers {i} and {j} have different layer_overrides "
                        f"({self._part_overrides(i, name)} vs {self._part_overrides(j, name)})"
                    )
                elif (
                    name == "mixer_weight_source"
                    and self.kv_source is not None
                    and ((self.kv_source[i] is None) != (self.kv_source[j] is None))
                ):
                    raise ValueError(
                        f"{where}: one of layers {i} and {j} reads another layer's K/V "
                        "(kv_source) and has no K/V projections to share"
                    )

    def _per_layer_fields(self, layer_idx: int) -> tuple[str, ...]:
        """The fields layer `layer_idx` may override: those its two mixers allow."""
        mixer = registry.sequence_mixer(self.mixers[layer_idx])
        channel = registry.channel_mixer(self.channel_mixers[layer_idx])
        return mixer.per_layer + channel.per_layer

    def _part_overrides(self, layer_idx: int, sharing: str) -> dict[str, Any]:
        """The overrides of one layer that shape its channel mixer (for channel-mixer sharing)
        or its sequence mixer (otherwise)."""
        overrides = (self.layer_overrides or [None] * self.num_hidden_layers)[layer_idx] or {}
        channel = registry.channel_mixer(self.channel_mixers[layer_idx]).per_layer
        wanted = sharing == "channel_mixer_weight_source"
        return {k: v for k, v in overrides.items() if (k in channel) == wanted}

    def for_layer(self, layer_idx: int) -> ZooConfig:
        """The config layer `layer_idx` is built from: this one with its `layer_overrides`."""
        overrides = (self.layer_overrides or [None] * self.num_hidden_layers)[layer_idx]
        if not overrides:
            return self
        layer = copy.copy(self)
        for key, value in overrides.items():
            object.__setattr__(layer, key, value)
        return layer

    @property
    def layer_pattern(self) -> str:
        """The layers in `parse_layer_pattern`'s compact syntax, e.g. "lightning:glu*24"."""
        return format_layer_pattern(self.mixers, self.channel_mixers)

    @property
    def has_moe(self) -> bool:
        """Whether any layer's channel mixer is a routed (MoE) layer."""
        return any(registry.channel_mixer(c).routed for c in self.channel_mixers)

    @property
    def sparsity(self) -> float:
        """1 - k/E as Abnar et al. define it (arXiv 2501.12370 Eq. 7); 0.0 for a dense model."""
        return 1 - self.num_experts_per_tok / self.num_experts if self.has_moe else 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> ZooConfig:
        """A named size of the family, e.g. `TNLConfig.from_size("410m", vocab_size=100_280)`.

        The sizes are the scaling-law paper's (arXiv 2406.16690): tied embeddings, head dim 128,
        context 8192. `overrides` replace any field.
        """
        key = size.lower()
        if key not in cls.named_sizes:
            raise ValueError(
                f"size={size!r} is not a named size of {cls.__name__}; "
                f"allowed: {list(cls.named_sizes)}"
            )
        row = cls.named_sizes[key]
        fields = {
            "num_hidden_layers": row.num_hidden_layers,
            "hidden_size": row.hidden_size,
            "num_attention_heads": row.num_attention_heads,
            "intermediate_size": row.intermediate_size,
            "tie_word_embeddings": True,
            "max_position_embeddings": 8192,
        }
        if row.num_experts:
            fields.update(
                num_experts=row.num_experts,
                num_experts_per_tok=row.num_experts_per_tok,
                moe_intermediate_size=row.moe_intermediate_size,
                channel_mixers=["moe"] * row.num_hidden_layers,
            )
        if row.pattern is not None:
            fields["mixers"], fields["channel_mixers"] = parse_layer_pattern(row.pattern)
        fields.update(copy.deepcopy(row.settings or {}))
        fields.update(overrides)
        return cls(**fields)


# The paper's table, with its two inconsistencies resolved as the papers note explains
# (shared/papers/linear-families.md §4): the 1B row uses g = 4096 and 12 heads (head dim 128),
# the only values that reproduce its own parameter counts; TNL/cosFormer2 use 25 layers at 410M.
_SL_SIZES: dict[str, NamedSize] = {
    "70m": NamedSize(6, 512, 4, 1536),
    "160m": NamedSize(12, 768, 6, 2048),
    "410m": NamedSize(26, 1024, 8, 2816),
    "1b": NamedSize(32, 1536, 12, 4096),
    "3b": NamedSize(35, 2560, 20, 6912),
    "7b": NamedSize(32, 4096, 32, 11008),
}


def _moe_sizes(dense: dict[str, NamedSize], names: dict[str, str]) -> dict[str, NamedSize]:
    """Mixtral-style MoE versions of dense rows: every MLP becomes 8 experts as wide as the
    dense MLP, top-2. `names` maps a dense size to the MoE name, "<total>-a<active>" (as in
    Qwen3-30B-A3B) counted with the scaling-law paper's vocabulary (100,280)."""
    return {
        moe_name: NamedSize(**{**vars(dense[size]), "num_experts": 8, "num_experts_per_tok": 2})
        for size, moe_name in names.items()
    }


class LlamaConfig(ZooConfig):
    """LLaMA (Touvron et al., arXiv 2302.13971): RMSNorm, RoPE, GQA softmax attention, SwiGLU."""

    model_type = "zoo_llama"
    default_mixer = "attention"
    default_channel_mixer = "swiglu"
    # Dense sizes, then Mixtral-like MoE sizes named by total and active parameters.
    named_sizes: ClassVar[dict[str, NamedSize]] = {
        **_SL_SIZES,
        **_moe_sizes(
            _SL_SIZES,
            {"70m": "170m-a86m", "160m": "560m-a220m", "410m": "2b-a660m", "1b": "5.3b-a1.7b"},
        ),
    }

    tie_word_embeddings: bool = False


_TNL_SIZES = {**_SL_SIZES, "410m": NamedSize(25, 1024, 8, 2816)}


def _released_tnl(layers: int, width: int, heads: int, glu: int, repo: str) -> NamedSize:
    """A released TransNormerLLM (OpenNLPLab, remote code) as zoo TNL settings: the plain linear
    output gate, learned LRPE in layer 0, embeddings times √d, SRMSNorm eps 1e-6, its 64K
    vocabulary and special tokens (zoo.convert.transnormer maps any such config.json)."""
    settings = {
        "vocab_size": 64000,
        "output_gate": "linear",
        "layer_overrides": [{"lightning_lrpe": True}] + [None] * (layers - 1),
        "embedding_multiplier": math.sqrt(width),
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return NamedSize(layers, width, heads, glu, settings=settings, released=repo)


# The released checkpoints' shapes (TransNormerLLM paper, arXiv 2307.14995, Table of model
# sizes; their parameter counts, 0.40B, 1.02B and 6.84B, agree with the README's 0.39B, 1.0B and
# 6.8B; the GLU widths are the released configs' glu_dim, not checked against the Hub offline).
_TNL_RELEASED = {
    "385m-released": _released_tnl(24, 1024, 8, 2816, "OpenNLPLab/TransNormerLLM-385M"),
    "1b-released": _released_tnl(16, 2048, 16, 5632, "OpenNLPLab/TransNormerLLM-1B"),
    "7b-released": _released_tnl(30, 4096, 32, 11008, "OpenNLPLab/TransNormerLLM-7B"),
}


class TNLConfig(ZooConfig):
    """TransNormerLLM (Qin et al., arXiv 2307.14995 / 2405.17381) as sized in arXiv 2406.16690.

    Lightning attention with per-head decay, SRMSNorm everywhere, the low-rank sigmoid output
    gate and the activation-free GLU channel mixer.
    """

    model_type = "zoo_tnl"
    default_mixer = "lightning"
    default_channel_mixer = "glu"
    named_sizes: ClassVar[dict[str, NamedSize]] = {
        **_TNL_SIZES,
        **_moe_sizes(
            _TNL_SIZES,
            {"70m": "170m-a87m", "160m": "560m-a220m", "410m": "1.9b-a650m", "1b": "5.3b-a1.7b"},
        ),
        **_TNL_RELEASED,
    }

    norm_type: str = "srmsnorm"


def _released_hgrn2(layers: int, width: int, heads: int, mlp: int, repo: str) -> NamedSize:
    """fla's released HGRN2 (fla-hub, trained 100B tokens): fla's variant as HGRN2 settings
    (q scaled by e^−1/2, an output RMSNorm with gain and eps 1e-5, RMSNorm blocks, SwiGLU MLPs,
    an untied head, Llama-2's 32K vocabulary); zoo.convert.fla_hgrn2 maps any such config.json."""
    settings = {
        "vocab_size": 32000,
        "channel_mixers": ["swiglu"] * layers,
        "norm_type": "rmsnorm",
        "rms_norm_eps": 1e-6,
        "hgrn2_expand_ratio": 128,
        "hgrn2_q_scale": "rsqrt_dim",
        "hgrn2_output_norm": "rmsnorm",
        "hgrn2_output_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "max_position_embeddings": 2048,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
    }
    return NamedSize(layers, width, heads, mlp, settings=settings, released=repo)


# The 1.3B matches the published count (1,364,396,032 parameters, 244 tensors); the 2.7B's
# shape is its GLA sibling's (2.70B parameters), not checked against the Hub offline.
_HGRN2_RELEASED = {
    "1.3b-fla": _released_hgrn2(24, 2048, 16, 5632, "fla-hub/hgrn2-1.3B-100B"),
    "2.7b-fla": _released_hgrn2(32, 2560, 20, 6912, "fla-hub/hgrn2-2.7B-100B"),
}


class HGRN2Config(ZooConfig):
    """HGRN2 (Qin et al., arXiv 2404.07904) as sized in arXiv 2406.16690.

    Gated linear RNN with outer-product state expansion (head dim `hgrn2_expand_ratio`), a
    data-dependent forget gate with a learned, depth-increasing lower bound, SRMSNorm and the
    activation-free GLU channel mixer.
    """

    model_type = "zoo_hgrn2"
    default_mixer = "hgrn2"
    default_channel_mixer = "glu"
    named_sizes = {**_SL_SIZES, **_HGRN2_RELEASED}

    norm_type: str = "srmsnorm"


class GLAConfig(ZooConfig):
    """Gated linear attention (Yang et al., arXiv 2312.06635) as fla's `GLAForCausalLM` builds
    it: GLA blocks (`zoo.layers.gla`, fla's defaults: key width d/2, value width d, forget gate of
    rank 16 over logsigmoid / 16) with RMSNorm and a SwiGLU MLP of width 8d/3 rounded up to 256
    (the backbone's default, fla's `GatedMLP` rule)."""

    model_type = "zoo_gla"
    default_mixer = "gla"
    default_channel_mixer = "swiglu"


class GatedDeltaNetConfig(ZooConfig):
    """Gated DeltaNet (Yang, Kautz & Hatamizadeh, arXiv 2412.06464) as fla's
    `GatedDeltaNetForCausalLM` builds it: Gated DeltaNet blocks (`zoo.layers.gated_deltanet`:
    key heads of the model's head size, value heads twice that as in fla, short convs of 4) with
    RMSNorm and a SwiGLU MLP of width 8d/3 rounded up to 256 (fla's `GatedMLP` rule)."""

    model_type = "zoo_gated_deltanet"
    default_mixer = "gated_deltanet"
    default_channel_mixer = "swiglu"


class CosFormer2Config(ZooConfig):
    """cosFormer2 (arXiv 2406.16690 §2.2): linear attention without decay, LRPE re-weighting.

    SiLU feature map, per-channel rotary re-weighting (LRPE), the low-rank sigmoid output gate
    and output normalisation instead of a denominator; activation-free GLU channel mixer.
    """

    model_type = "zoo_cosformer2"
    default_mixer = "cosformer2"
    default_channel_mixer = "glu"
    named_sizes = _TNL_SIZES

    norm_type: str = "srmsnorm"


# Released Mamba sizes (state-spaces/mamba README: 24x768 ... 64x2560). The MAD paper's scaling
# table was not available (shared/papers/mamba-hyena.md §3), so these are not from MAD. Heads
# and intermediate size are unused by a pure Mamba (no attention, no channel mixer).
_MAMBA_SIZES: dict[str, NamedSize] = {
    "130m": NamedSize(24, 768, 12, 2048),
    "370m": NamedSize(48, 1024, 16, 2816),
    "790m": NamedSize(48, 1536, 24, 4096),
    "1.4b": NamedSize(48, 2048, 32, 5632),
    "2.8b": NamedSize(64, 2560, 40, 6912),
}


class MambaConfig(ZooConfig):
    """Mamba (Gu & Dao, arXiv 2312.00752): selective SSM blocks, no channel mixer, RMSNorm."""

    model_type = "zoo_mamba"
    default_mixer = "mamba"
    default_channel_mixer = "none"
    named_sizes = _MAMBA_SIZES

    rms_norm_eps: float = 1e-5


# Released Mamba2 sizes (state-spaces/mamba README: mamba2-130m … mamba2-2.7b, trained on the
# Pile with the GPT-NeoX vocabulary): d_state 128, head dim 64, expand 2, one group, no channel
# mixer. Heads and intermediate size are unused by a pure Mamba2.
_MAMBA2_SIZES: dict[str, NamedSize] = {
    "130m": NamedSize(24, 768, 12, 2048),
    "370m": NamedSize(48, 1024, 16, 2816),
    "780m": NamedSize(48, 1536, 24, 4096),
    "1.3b": NamedSize(48, 2048, 32, 5632),
    "2.7b": NamedSize(64, 2560, 40, 6912),
}


class Mamba2Config(ZooConfig):
    """Mamba2 (Dao & Gu, arXiv 2405.21060): SSD blocks (`zoo.layers.mamba2`: scalar per-head
    decay, N = 128 states per head of 64 channels, a gated RMSNorm), no channel mixer, RMSNorm,
    transformers' `Mamba2ForCausalLM` layout."""

    model_type = "zoo_mamba2"
    default_mixer = "mamba2"
    default_channel_mixer = "none"
    named_sizes = _MAMBA2_SIZES

    rms_norm_eps: float = 1e-5


# safari's Pile configs (shared/papers/mamba-hyena.md §2): hyena-small 18x864 and the generic
# 355M/1.3B/2.7B shapes it shares with H3; not from MAD, whose table was not available. safari's
# channel mixer is a GELU MLP (inner 2d for hyena-small, 4d for the others); our SwiGLU width g
# is chosen so 3dg matches that MLP's parameters (g = 4d/3 and ~8d/3, multiples of 64).
_HYENA_SIZES: dict[str, NamedSize] = {
    "153m": NamedSize(18, 864, 8, 1152),
    "355m": NamedSize(24, 1024, 8, 2752),
    "1.3b": NamedSize(24, 2048, 16, 5504),
    "2.7b": NamedSize(32, 2560, 20, 6912),
    # safari's released Zymrael/hyena-small-150b-tok, as its eval config loads it
    # (configs/evals/hyena_small_150b.yaml): LayerNorm blocks, tanh-GELU MLPs, trained positional
    # features, no decay window; 153.7M parameters. zoo.convert.safari_hyena maps such a config.
    "153m-safari": NamedSize(
        18,
        864,
        1,
        1728,
        settings={
            "vocab_size": 50264,  # GPT-2's 50257, padded to a multiple of 8
            "channel_mixers": ["gelu_mlp"] * 18,
            "gelu_mlp_approximate": "tanh",
            "norm_type": "layernorm",
            "rms_norm_eps": 1e-5,
            "hyena_modulate": False,
            "hyena_learned_pos_emb": True,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "pad_token_id": None,
        },
        released="Zymrael/hyena-small-150b-tok",
    ),
}


class HyenaConfig(ZooConfig):
    """Hyena (Poli et al., arXiv 2302.10866): order-N Hyena operator with a SwiGLU channel mixer.

    The implicit filters are defined over `max_position_embeddings` positions (safari's l_max).
    """

    model_type = "zoo_hyena"
    default_mixer = "hyena"
    default_channel_mixer = "swiglu"
    named_sizes = _HYENA_SIZES

    max_position_embeddings: int = 2048

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> ZooConfig:
        # safari's filters span l_max = 2048 positions; 8192 would stretch every decay window 4x.
        return super().from_size(size, **{"max_position_embeddings": 2048, **overrides})


# MAD's best striped designs (arXiv 2403.17844 §6): one attention layer in four (the optimal
# hybridisation ratio of its IsoFLOP sweep) striped with Hyena, Mamba or TNL, every channel mixer
# a top-2-of-8 MoE layer with experts as wide as a dense SwiGLU (Mixtral-style).
# (width, heads, dense / expert width, experts, top-k) of every hybrid size below.
_WIDTH_768_MOE = (768, 6, 2048, 8, 2)
_HYBRID_SIZES: dict[str, NamedSize] = {
    "striped-hyena-moe-520m-a180m": NamedSize(
        12, *_WIDTH_768_MOE, pattern="(hyena:moe*3 attention:moe)*3"
    ),
    "striped-mamba-moe-530m-a190m": NamedSize(
        12, *_WIDTH_768_MOE, pattern="(mamba:moe*3 attention:moe)*3"
    ),
    "striped-tnl-moe-520m-a180m": NamedSize(
        12, *_WIDTH_768_MOE, pattern="(lightning:moe*3 attention:moe)*3"
    ),
    # Today's production hybrids as patterns, at the width of the sizes above. Jamba's block
    # (arXiv 2403.19887: 8 layers, attention at offset 4, MoE every other layer from offset 1;
    # Jamba has Mamba-1 layers and 16 experts, Jamba-like designs since Mamba2), twice:
    "jamba-like-mamba2-moe-440m-a210m": NamedSize(
        16,
        *_WIDTH_768_MOE,
        pattern="(mamba2:swiglu mamba2:moe mamba2:swiglu mamba2:moe attention:swiglu mamba2:moe "
        "mamba2:swiglu mamba2:moe)*2",
    ),
    # Qwen3-Next's layout (three Gated DeltaNet layers, then one attention layer; MoE with a
    # shared expert everywhere; twice as many value heads as query/key heads of 128, here 64):
    "qwen3-next-like-gdn-moe-580m-a240m": NamedSize(
        12,
        *_WIDTH_768_MOE,
        pattern="(gated_deltanet:moe*3 attention:moe)*3",
        settings=dict(
            num_shared_experts=1,
            gdn_num_heads=6,
            gdn_num_v_heads=12,
            gdn_head_dim=64,
            gdn_expand_v=1.0,
        ),
    ),
}


class HybridConfig(ZooConfig):
    """A striped hybrid: any per-layer pattern of the zoo's mixers.

    `HybridConfig.from_pattern("(lightning:moe*3 attention:moe)*2")` is eight blocks, every
    fourth one softmax attention, every channel mixer a MoE layer; config.json keeps the
    expanded per-layer lists. The named sizes are the MAD paper's best striped designs
    (arXiv 2403.17844: striped hybrids with MoE channel mixers, 25% attention layers), named by
    total and active parameters with the GPT-NeoX vocabulary (50,280), as in MAD's Pile runs.
    """

    model_type = "zoo_hybrid"
    named_sizes: ClassVar[dict[str, NamedSize]] = _HYBRID_SIZES

    @classmethod
    def from_pattern(cls, pattern: str, **overrides: Any) -> HybridConfig:
        """A hybrid whose layers follow `pattern` (see `parse_layer_pattern`)."""
        mixers, channel_mixers = parse_layer_pattern(pattern)
        fields = {"num_hidden_layers": len(mixers), **overrides}
        return cls(mixers=mixers, channel_mixers=channel_mixers, **fields)
