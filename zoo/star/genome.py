"""STAR genomes over the zoo's operators, and how they decode to a `HybridConfig`.

"STAR: Synthesis of Tailored Architectures" (Thomas et al., arXiv 2411.17800) writes an
architecture as a hierarchy of integers. Ours keeps its two levels:

- the **backbone genome**: one 5-integer tuple per LIV position,
  (LIV class, featurizer-sharing group, featurizer-sharing strategy, feature-group-sharing group,
  feature-group-sharing strategy), strategy 1 = share nothing, 2 = share;
- the **operator genomes**: one per LIV class of the pool, (expansion option, repeat option):
  the featurizer's expansion factor (an MLP's width, an SSM's state size, Hyena's order) and
  repeat factor (how many query heads read one K/V head). Every class also carries STAR's fixed
  5-integer operator code (featurizer, token mixing, sparsity, nonlinearity, channel mixing),
  which names what kind of linear input-varying system it is.

Written out, a genome is its backbone tuples joined by "-", then "|" and the operator genes two
digits per class: `"11111-11111-51211-11111|00 00 00 00 00 00 00|10 00 00 00"` (spaces optional;
a gene past 9, the tenth token class, is a base-36 letter: `"a1111"`).

Our choices where the paper is silent or the zoo differs (shared/papers/star.md):

- The zoo's blocks are (sequence mixer, channel mixer) pairs, so LIV positions alternate: even
  positions take token-mixing classes, odd positions memoryless channel-mixing classes (STAR lets
  any class sit anywhere; "none" at an odd position stacks two token mixers directly).
- The class pool maps STAR's classes to the zoo's operators (and GLA, Mamba2 and Gated DeltaNet,
  appended as recurrent classes of their own). SA-1/3/4 become one class "SA"
  whose repeat factor (1, 2, 4) is an operator gene; Rec-1/2 are Mamba with state expansion 16
  or 4 (one class, an expansion gene) and HGRN2; GConv-1 is the gated short conv, GConv-2 Hyena;
  linear attention with and without decay (TNL, cosFormer2) are classes of their own (STAR's
  pool has none). Not in the zoo, so not in the pool: SA-2 (attention over short-conv'd
  features; nearest: SA), the differential variants (LIV₁ − LIV₂), banded sparsity and the
  sliding-window SA the strategy genes of the paper's appendix hint at.
- Featurizer sharing ties every weight of the LIV (STAR's strategy 2, "all weights shared"):
  a position with strategy 2 uses the weights of the first earlier position of the same class
  and sharing group. Tied parameters are real (`ZooConfig.mixer_weight_source`) and counted once.
- Feature-group sharing is real where the zoo has an operator that can read another layer's
  features: softmax attention reading the K/V of the first earlier SA position of its group
  (`ZooConfig.kv_source`), which removes that layer's KV cache. For the other classes the genes
  are kept but have no effect (such genomes share one hash: `Genome.digest`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zoo import registry
from zoo.configuration import HybridConfig, format_layer_pattern

# One character per backbone gene: base 36, so that classes past the ninth keep one digit.
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
# Positions of the backbone tuple.
CLASS, FZ_GROUP, FZ_STRATEGY, FG_GROUP, FG_STRATEGY = range(5)
NO_SHARING, SHARE = 1, 2


class GenomeError(ValueError):
    """A genome that cannot be read or decoded; the message says which gene and why."""


@dataclass(frozen=True)
class LIVClass:
    """One class of the pool: a zoo operator, its STAR operator code and its evolvable options."""

    name: str
    operator: str
    """The zoo's sequence mixer (token classes) or channel mixer (channel classes)."""
    code: tuple[int, int, int, int, int]
    """STAR's operator genome: featurizer class; token mixing (1 diagonal, 2 low rank, 3 scaled
    Toeplitz, 4 semi-separable); sparsity (1 none); nonlinearity (1 none, 2 softmax, 4 swish);
    channel mixing (1 diagonal, 2 dense, 3 grouped)."""
    expansion: tuple[tuple[str, Any], ...] = ()
    """(field, value) options of the expansion gene; values of `intermediate_size` and
    `moe_intermediate_size` are multiples of the width."""
    repeat: tuple[int, ...] = ()
    """Options of the repeat gene: query heads per K/V head."""
    kv_sharing: bool = False
    """Whether a position of this class can read another's K/V (feature-group sharing)."""

    @property
    def n_expansion(self) -> int:
        return max(1, len(self.expansion))

    @property
    def n_repeat(self) -> int:
        return max(1, len(self.repeat))


TOKEN_CLASSES: tuple[LIVClass, ...] = (
    LIVClass("SA", "attention", (1, 2, 1, 2, 2), repeat=(1, 2, 4), kv_sharing=True),
    LIVClass("LA-decay", "lightning", (2, 4, 1, 1, 2)),
    LIVClass("LA", "cosformer2", (3, 2, 1, 1, 2)),
    LIVClass("Rec-HGRN2", "hgrn2", (4, 4, 1, 1, 2), expansion=(("hgrn2_expand_ratio", 16),)),
    LIVClass(
        "Rec-Mamba",
        "mamba",
        (5, 4, 1, 1, 1),
        expansion=(("mamba_d_state", 16), ("mamba_d_state", 4)),
    ),
    LIVClass("GConv-short", "gated_conv", (7, 3, 1, 1, 1)),
    LIVClass(
        "GConv-Hyena", "hyena", (8, 3, 1, 1, 1), expansion=(("hyena_order", 2), ("hyena_order", 3))
    ),
    # The mixers of today's hybrids (added after the first searches: appended, so that a genome
    # of the older pool still reads; see `Genome.parse`). GLA's decay is per key channel, Mamba2's
    # and Gated DeltaNet's per head (semi-separable); the delta rule's write is a low-rank update.
    LIVClass("Rec-GLA", "gla", (11, 4, 1, 1, 2)),
    LIVClass(
        "Rec-Mamba2",
        "mamba2",
        (12, 4, 1, 1, 1),
        expansion=(("mamba2_d_state", 16), ("mamba2_d_state", 64)),
    ),
    LIVClass("Rec-GDN", "gated_deltanet", (13, 4, 1, 1, 2)),
)
_WIDTHS = (("intermediate_size", 2.0), ("intermediate_size", 8 / 3), ("intermediate_size", 4.0))
CHANNEL_CLASSES: tuple[LIVClass, ...] = (
    LIVClass("SwiGLU", "swiglu", (9, 1, 1, 4, 2), expansion=_WIDTHS),
    LIVClass("GLU", "glu", (9, 1, 1, 1, 2), expansion=_WIDTHS),
    LIVClass(
        "MoE",
        "moe",
        (10, 1, 1, 4, 3),
        expansion=(("moe_intermediate_size", 1.0), ("moe_intermediate_size", 2.0)),
    ),
    LIVClass("Identity", "none", (0, 1, 1, 1, 1)),
)
POOL: tuple[LIVClass, ...] = TOKEN_CLASSES + CHANNEL_CLASSES


@dataclass(frozen=True)
class Backbone:
    """What STAR fixes by hand per search: depth, width and the shared operator settings."""

    blocks: int = 4
    """(token, channel) pairs: the genome has 2 · blocks LIV positions."""
    hidden_size: int = 64
    num_attention_heads: int = 4
    groups: int = 4
    """Sharing groups 1..groups for both kinds of sharing."""
    num_experts: int = 4
    num_experts_per_tok: int = 2
    config: dict[str, Any] = field(default_factory=dict)
    """Any other `HybridConfig` fields every decoded model gets (vocab, chunk sizes, context)."""
    token_classes: tuple[LIVClass, ...] = TOKEN_CLASSES
    """The token-mixing pool: the zoo's classes, plus any `LIVClass` of a mixer registered
    elsewhere (`zoo.register_mixer`)."""
    channel_classes: tuple[LIVClass, ...] = CHANNEL_CLASSES

    def __post_init__(self) -> None:
        for name in ("blocks", "hidden_size", "num_attention_heads", "groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise GenomeError(f"backbone.{name}={value!r} must be a positive integer")
        if self.groups > 9:
            raise GenomeError(f"backbone.groups={self.groups} must be <= 9 (one digit per gene)")
        for classes, known, kind in (
            (self.token_classes, registry.sequence_mixers(), "sequence mixer"),
            (self.channel_classes, registry.channel_mixers(), "channel mixer"),
        ):
            for cls in classes:
                if cls.operator not in known:
                    raise GenomeError(
                        f"class {cls.name}: {cls.operator!r} is not a registered {kind}"
                    )
        if len({c.name for c in self.pool}) != len(self.pool):
            raise GenomeError("the pool names a class twice")
        for k, cls in enumerate(self.pool):
            for genes in itertools.product(range(cls.n_expansion), range(cls.n_repeat)):
                self._check_option(cls, genes, channel=k >= len(self.token_classes))

    def _check_option(self, cls: LIVClass, genes: tuple[int, int], channel: bool) -> None:
        """Every option of a class must build on this backbone: one layer of it is validated
        as a config (a ratio that must divide the width, heads per K/V head, ...)."""
        overrides = _class_overrides(cls, genes, self)
        layer = {"mixers": ["attention"], "channel_mixers": [cls.operator]}
        if not channel:
            layer = {"mixers": [cls.operator], "channel_mixers": ["none"]}
        try:
            HybridConfig(
                **{
                    "num_attention_heads": self.num_attention_heads,
                    "num_experts": self.num_experts,
                    "num_experts_per_tok": self.num_experts_per_tok,
                    **self.config,
                    "hidden_size": self.hidden_size,
                    "num_hidden_layers": 1,
                    **layer,
                    "layer_overrides": [overrides or None],
                }
            )
        except ValueError as error:
            raise GenomeError(f"class {cls.name}, option {genes}: {error}") from None

    @property
    def pool(self) -> tuple[LIVClass, ...]:
        """Token classes, then channel classes: the order of the operator genes."""
        return self.token_classes + self.channel_classes

    @property
    def positions(self) -> int:
        return 2 * self.blocks

    @property
    def length(self) -> int:
        """Genes in the flat vector: 5 per position, 2 per class of the pool."""
        return 5 * self.positions + 2 * len(self.pool)

    def classes_at(self, position: int) -> tuple[LIVClass, ...]:
        return self.token_classes if position % 2 == 0 else self.channel_classes

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive (low, high) of every gene of the flat vector."""
        low, high = [], []
        for position in range(self.positions):
            n = len(self.classes_at(position))
            low += [1, 1, 1, 1, 1]
            high += [n, self.groups, 2, self.groups, 2]
        for cls in self.pool:
            low += [0, 0]
            high += [cls.n_expansion - 1, cls.n_repeat - 1]
        return np.array(low), np.array(high)


@dataclass(frozen=True)
class Genome:
    """A backbone genome (one 5-tuple per position) and one (expansion, repeat) per class."""

    backbone: tuple[tuple[int, int, int, int, int], ...]
    operators: tuple[tuple[int, int], ...]
    token_classes: int = field(default=len(TOKEN_CLASSES), compare=False)
    """How many of `operators` belong to token classes (where `str` puts the '|')."""

    # -- the flat integer vector pymoo evolves -----------------------------------------------

    def to_vector(self) -> np.ndarray:
        return np.array(
            [g for t in self.backbone for g in t] + [g for t in self.operators for g in t]
        )

    @classmethod
    def from_vector(cls, vector: Any, space: Backbone) -> Genome:
        values = [round(float(v)) for v in np.asarray(vector).ravel()]
        if len(values) != space.length:
            raise GenomeError(
                f"a genome of this backbone has {space.length} genes "
                f"({space.positions} positions × 5 + {len(space.pool)} classes × 2), "
                f"got {len(values)}"
            )
        cut = 5 * space.positions
        backbone = tuple(tuple(values[i : i + 5]) for i in range(0, cut, 5))
        operators = tuple(tuple(values[i : i + 2]) for i in range(cut, len(values), 2))
        return cls(backbone, operators, len(space.token_classes))  # type: ignore[arg-type]

    # -- text ---------------------------------------------------------------------------------

    def __str__(self) -> str:
        backbone = "-".join("".join(_DIGITS[g] for g in t) for t in self.backbone)
        token = " ".join(f"{e}{r}" for e, r in self.operators[: self.token_classes])
        channel = " ".join(f"{e}{r}" for e, r in self.operators[self.token_classes :])
        return f"{backbone}|{token}|{channel}"

    @classmethod
    def parse(cls, text: str, space: Backbone) -> Genome:
        """The genome written by `str(genome)`; the operator part may be left out (all zeros)."""
        parts = text.strip().split("|")
        if not re.fullmatch(r"[0-9a-z]{5}(-[0-9a-z]{5})*", parts[0].strip()):
            raise GenomeError(
                f"genome {text!r}: the backbone must be 5-digit tuples joined by '-' "
                "(class, featurizer group, featurizer strategy, feature group, feature strategy; "
                "a class past 9 is a letter, 10 = 'a')"
            )
        backbone = [int(c, 36) for c in parts[0].replace("-", "")]
        sections = [re.sub(r"\s", "", p) for p in parts[1:]]
        if len(sections) == 2:
            # backbone|token|channel: a section shorter than this pool's is a genome of an older,
            # smaller pool (classes are only appended); the classes it lacks get zero genes.
            counts = (len(space.token_classes), len(space.channel_classes))
            sections = [sec.ljust(2 * n, "0") for sec, n in zip(sections, counts, strict=True)]
        digits = "".join(sections)
        if not re.fullmatch(r"\d*", digits):
            raise GenomeError(f"genome {text!r}: operator genes must be digits")
        operators = [int(c) for c in digits] or [0] * (2 * len(space.pool))
        genome = cls.from_vector(backbone + operators, space)
        check(genome, space)
        return genome

    # -- identity -----------------------------------------------------------------------------

    def digest(self, space: Backbone) -> str:
        """A short hash of the architecture the genome decodes to: genomes that differ only in
        genes without effect (sharing genes of a position that shares nothing, options of an
        unused class) build the same model, share the hash and so one evaluation."""
        fields = decode_fields(self, space)
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- validity ---------------------------------------------------------------------------------


def problems(genome: Genome, space: Backbone) -> list[str]:
    """Why a genome is invalid for `space` (an empty list: it is valid)."""
    low, high = space.bounds()
    vector = genome.to_vector()
    if len(vector) != space.length:
        return [f"{len(vector)} genes, the backbone needs {space.length}"]
    names = [
        "class",
        "featurizer group",
        "featurizer strategy",
        "feature group",
        "feature strategy",
    ]
    found = []
    for i, (value, lo, hi) in enumerate(zip(vector, low, high, strict=True)):
        if not lo <= value <= hi:
            if i < 5 * space.positions:
                where = f"position {i // 5} ({names[i % 5]})"
            else:
                k = (i - 5 * space.positions) // 2
                where = f"class {space.pool[k].name} ({'repeat' if i % 2 else 'expansion'})"
            found.append(f"{where}: {value} is outside [{lo}, {hi}]")
    return found


def check(genome: Genome, space: Backbone) -> None:
    """Raise `GenomeError` with every reason a genome is invalid."""
    found = problems(genome, space)
    if found:
        raise GenomeError(f"invalid genome {genome}: " + "; ".join(found))


def repair(vector: np.ndarray, space: Backbone) -> np.ndarray:
    """The nearest valid vector: every gene clipped into its range (what mutation and crossover
    can break is only a range: any in-range vector decodes)."""
    low, high = space.bounds()
    return np.clip(np.rint(np.asarray(vector, dtype=float)), low, high).astype(int)


# -- decoding ---------------------------------------------------------------------------------


def _class_overrides(cls: LIVClass, genes: tuple[int, int], space: Backbone) -> dict[str, Any]:
    expansion, repeat = genes
    overrides: dict[str, Any] = {}
    if cls.expansion:
        name, value = cls.expansion[min(expansion, cls.n_expansion - 1)]
        if name in ("intermediate_size", "moe_intermediate_size"):
            value = round(value * space.hidden_size / 8) * 8  # a multiple of 8 channels
        overrides[name] = value
    if cls.repeat:
        overrides["num_key_value_heads"] = (
            space.num_attention_heads // cls.repeat[min(repeat, cls.n_repeat - 1)]
        )
    return overrides


def _decode(genome: Genome, space: Backbone) -> dict[str, Any]:
    check(genome, space)
    n = space.blocks
    mixers, channels, overrides = [], [], []
    sources: dict[str, list[int | None]] = {
        "mixer_weight_source": [None] * n,
        "channel_mixer_weight_source": [None] * n,
        "kv_source": [None] * n,
    }
    owners: dict[tuple[str, int, int], int] = {}
    for block in range(n):
        layer: dict[str, Any] = {}
        for kind, part in enumerate(("mixer", "channel_mixer")):
            genes = genome.backbone[2 * block + kind]
            k = genes[CLASS] - 1 + (len(space.token_classes) if kind else 0)
            cls = space.pool[k]
            (channels if kind else mixers).append(cls.operator)
            layer.update(_class_overrides(cls, genome.operators[k], space))
            if cls.operator == "none":
                continue
            key = (part, k, genes[FZ_GROUP])
            if genes[FZ_STRATEGY] == SHARE and key in owners:
                sources[f"{part}_weight_source"][block] = owners[key]
            else:
                owners.setdefault(key, block)
            if cls.kv_sharing and not kind:
                key = ("kv", k, genes[FG_GROUP])
                if genes[FG_STRATEGY] == SHARE and key in owners:
                    sources["kv_source"][block] = owners[key]
                else:
                    owners.setdefault(key, block)
        overrides.append(layer or None)
    # A layer tied to one that reads another's K/V (or the other way round) has different
    # weights to tie: the K/V reading wins and the weight tie is dropped.
    mixer_source, kv = sources["mixer_weight_source"], sources["kv_source"]
    for block, j in enumerate(mixer_source):
        if j is not None and (kv[block] is None) != (kv[j] is None):
            mixer_source[block] = None
    return {"mixers": mixers, "channel_mixers": channels, "layer_overrides": overrides, **sources}


def decode_fields(genome: Genome, space: Backbone) -> dict[str, Any]:
    """The `HybridConfig` fields of a genome (what a recipe's `model.overrides` holds)."""
    fields = _decode(genome, space)
    for name in ("mixer_weight_source", "channel_mixer_weight_source", "kv_source"):
        if all(j is None for j in fields[name]):
            fields[name] = None
    if all(o is None for o in fields["layer_overrides"]):
        fields["layer_overrides"] = None
    return {
        "hidden_size": space.hidden_size,
        "num_hidden_layers": space.blocks,
        "num_attention_heads": space.num_attention_heads,
        "num_experts": space.num_experts,
        "num_experts_per_tok": space.num_experts_per_tok,
        **space.config,
        **fields,
    }


def decode(genome: Genome, space: Backbone) -> HybridConfig:
    """The model a genome stands for; a genome that does not decode raises `GenomeError`."""
    try:
        return HybridConfig(**decode_fields(genome, space))
    except ValueError as error:
        raise GenomeError(f"genome {genome} does not decode: {error}") from None


def describe(genome: Genome, space: Backbone) -> list[str]:
    """One readable line per block: operators, their options and what they share."""
    fields = _decode(genome, space)
    lines = []
    for block in range(space.blocks):
        token = genome.backbone[2 * block][CLASS] - 1
        channel = genome.backbone[2 * block + 1][CLASS] - 1 + len(space.token_classes)
        parts = []
        for k, part in ((token, "mixer"), (channel, "channel_mixer")):
            cls = space.pool[k]
            options = _class_overrides(cls, genome.operators[k], space)
            text = cls.name + (
                f"({', '.join(f'{a}={b}' for a, b in options.items())})" if options else ""
            )
            source = fields[f"{part}_weight_source"][block]
            if source is not None:
                text += f" [weights of block {source}]"
            if part == "mixer" and fields["kv_source"][block] is not None:
                text += f" [K/V of block {fields['kv_source'][block]}]"
            parts.append(text)
        lines.append(f"{block}: " + " + ".join(parts))
    return lines


def layer_pattern(genome: Genome, space: Backbone) -> str:
    """The compact `mixer:channel_mixer` pattern (what `HybridConfig.from_pattern` reads)."""
    fields = _decode(genome, space)
    return format_layer_pattern(fields["mixers"], fields["channel_mixers"])


def from_layers(
    mixers: list[str],
    channel_mixers: list[str],
    space: Backbone,
    operators: dict[str, tuple[int, int]] | None = None,
) -> Genome:
    """The genome of a hand-made stack (no sharing): e.g. a Transformer++ or a striped hybrid.
    `operators` sets a class's (expansion, repeat) genes by class name."""
    if len(mixers) != space.blocks or len(channel_mixers) != space.blocks:
        raise GenomeError(
            f"need {space.blocks} mixers and channel mixers, "
            f"got {len(mixers)} and {len(channel_mixers)}"
        )
    token_ids = {c.operator: i + 1 for i, c in enumerate(space.token_classes)}
    channel_ids = {c.operator: i + 1 for i, c in enumerate(space.channel_classes)}
    backbone = []
    for mixer, channel in zip(mixers, channel_mixers, strict=True):
        if mixer not in token_ids:
            raise GenomeError(f"{mixer!r} is not in the token-mixing pool {sorted(token_ids)}")
        if channel not in channel_ids:
            raise GenomeError(
                f"{channel!r} is not in the channel-mixing pool {sorted(channel_ids)}"
            )
        backbone += [(token_ids[mixer], 1, 1, 1, 1), (channel_ids[channel], 1, 1, 1, 1)]
    genes = operators or {}
    ops = tuple(genes.get(c.name, (0, 0)) for c in space.pool)
    genome = Genome(tuple(backbone), ops, len(space.token_classes))  # type: ignore[arg-type]
    check(genome, space)
    return genome


def _option_index(cls: LIVClass, overrides: dict[str, Any], space: Backbone) -> tuple[int, int]:
    """The (expansion, repeat) genes of `cls` that produce `overrides`."""
    for e in range(cls.n_expansion):
        for r in range(cls.n_repeat):
            wanted = _class_overrides(cls, (e, r), space)
            if all(overrides.get(k) == v for k, v in wanted.items()):
                return e, r
    raise GenomeError(f"{cls.name}: no operator option gives {overrides}")


def _sharing_genes(
    classes: list[int], sources: list[int | None], groups: int, what: str
) -> list[tuple[int, int]]:
    """(group, strategy) per block so that `_decode` finds exactly `sources`: a reader joins its
    source's group with strategy 2; a source takes a group no earlier block of its class holds;
    any other block joins an earlier source's group (it is then not first there) or a group no
    source of its class uses."""
    roots = {j for j in sources if j is not None}
    genes: list[tuple[int, int]] = []
    root_group: dict[int, int] = {}
    for block, (k, source) in enumerate(zip(classes, sources, strict=True)):
        same = [b for b in range(block) if classes[b] == k]
        if source is not None:
            genes.append((root_group[source], SHARE))
            continue
        if block in roots:
            taken = {genes[b][0] for b in same}
            free = [g for g in range(1, groups + 1) if g not in taken]
            if not free:
                raise GenomeError(
                    f"{what}: block {block} needs a sharing group; all {groups} taken"
                )
            root_group[block] = free[0]
            genes.append((free[0], NO_SHARING))
            continue
        earlier_roots = [root_group[b] for b in same if b in root_group]
        later_roots = {b for b in roots if b > block and classes[b] == k}
        if earlier_roots:
            genes.append((earlier_roots[0], NO_SHARING))
        elif len(later_roots) < groups:
            # Groups the later sources will take: they pick the lowest free ones in order.
            genes.append((groups, NO_SHARING) if later_roots else (1, NO_SHARING))
        else:
            raise GenomeError(f"{what}: more sources of one class than sharing groups ({groups})")
    return genes


def encode(config: Any, space: Backbone) -> Genome:
    """The genome of a config (`decode`'s inverse): `decode(encode(c))` builds the same model.

    Raises `GenomeError` for what the pool or the backbone cannot express (an operator outside
    the pool, per-layer settings that are not an option of the class, a different width)."""
    if (config.num_hidden_layers, config.hidden_size) != (space.blocks, space.hidden_size):
        raise GenomeError(
            f"config has {config.num_hidden_layers} layers of width {config.hidden_size}; the "
            f"backbone {space.blocks} of width {space.hidden_size}"
        )
    n = space.blocks
    overrides = [(config.layer_overrides or [None] * n)[b] or {} for b in range(n)]
    n_token = len(space.token_classes)
    token_ids = {c.operator: i for i, c in enumerate(space.token_classes)}
    channel_ids = {c.operator: i + n_token for i, c in enumerate(space.channel_classes)}
    classes: dict[str, list[int]] = {"mixer": [], "channel_mixer": []}
    operators = [(0, 0)] * len(space.pool)
    for b in range(n):
        for part, ids, name in (
            ("mixer", token_ids, config.mixers[b]),
            ("channel_mixer", channel_ids, config.channel_mixers[b]),
        ):
            if name not in ids:
                raise GenomeError(f"{part}s[{b}]={name!r} is not in the pool {sorted(ids)}")
            k = ids[name]
            cls = space.pool[k]
            # A class without layer overrides runs the model-wide value: option 0 must give it.
            layer = {f: overrides[b].get(f, getattr(config, f)) for f, _ in cls.expansion}
            if cls.repeat:
                layer["num_key_value_heads"] = config.for_layer(b).num_key_value_heads
            genes = _option_index(cls, layer, space)
            used = [c for c in classes[part] if c == k]
            if used and operators[k] != genes:
                raise GenomeError(f"{part}s: two {cls.name} layers with different settings")
            operators[k] = genes
            classes[part].append(k)
    backbone: list[list[int]] = [[0] * 5 for _ in range(2 * n)]
    for kind, part in enumerate(("mixer", "channel_mixer")):
        sources = getattr(config, f"{part}_weight_source") or [None] * n
        fz = _sharing_genes(classes[part], sources, space.groups, f"{part}_weight_source")
        kv = [(1, NO_SHARING)] * n
        if kind == 0:
            kv_sources = config.kv_source or [None] * n
            kv = _sharing_genes(classes[part], kv_sources, space.groups, "kv_source")
        for b in range(n):
            k = classes[part][b] - (n_token if kind else 0)
            backbone[2 * b + kind] = [k + 1, *fz[b], *kv[b]]
    genome = Genome(tuple(map(tuple, backbone)), tuple(operators), n_token)  # type: ignore[arg-type]
    check(genome, space)
    return genome


# -- variation --------------------------------------------------------------------------------


def random_vector(space: Backbone, rng: np.random.Generator) -> np.ndarray:
    low, high = space.bounds()
    return rng.integers(low, high + 1)


def mutate(
    vector: np.ndarray, space: Backbone, rng: np.random.Generator, rate: float
) -> np.ndarray:
    """STAR's per-gene mutation: each gene, with probability `rate`, is redrawn uniformly from
    its range (a different value where there is one)."""
    low, high = space.bounds()
    out = np.asarray(vector).astype(int).copy()
    for i in np.flatnonzero(rng.random(len(out)) < rate):
        if high[i] > low[i]:
            choices = [v for v in range(low[i], high[i] + 1) if v != out[i]]
            out[i] = choices[rng.integers(len(choices))]
    return out


def crossover(
    a: np.ndarray, b: np.ndarray, space: Backbone, rng: np.random.Generator, points: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """k-point crossover (STAR: k = 2) with cut points on gene-tuple boundaries, so a position's
    five genes and a class's two genes always travel together."""
    bounds = [5 * p for p in range(1, space.positions + 1)]
    bounds += [5 * space.positions + 2 * k for k in range(1, len(space.pool))]
    cuts = sorted(rng.choice(bounds, size=min(points, len(bounds)), replace=False))
    child_a, child_b = np.asarray(a).copy(), np.asarray(b).copy()
    swap = False
    start = 0
    for cut in [*cuts, len(child_a)]:
        if swap:
            child_a[start:cut], child_b[start:cut] = b[start:cut], a[start:cut]
        swap = not swap
        start = cut
    return repair(child_a, space), repair(child_b, space)
