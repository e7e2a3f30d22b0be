"""Embedded default data: a synthetic corpus generated on the spot, plus local text/jsonl files.

Nothing is downloaded. The default corpus is a seeded mixture of three kinds of document, each
chosen to give a small model something it can actually learn:

* **grammar** (default weight 0.6): one to four sentences from a small probabilistic grammar of
  English-like text, e.g. "The old cats see a dog near the river, but this bird sleeps." Words
  are drawn with Zipf-like weights from lists of 20-40 nouns, verbs, adjectives, prepositions
  and determiners, with subject-verb number agreement ("the cat sees" / "the cats see"), "a" /
  "an", optional adjectives, prepositional phrases and clause conjunctions. This gives local
  statistics (spelling, word order, agreement) that a ~1M-parameter byte model picks up within a
  few hundred steps, well below the byte unigram entropy.
* **recall** (0.2): "recall: ka=17 mo=3 zu=88 ; mo? 3 ka? 17". Keys and values are random, so
  the answers are predictable only by looking them up in the context (associative recall).
* **copy** (0.2): "copy: qxbtr | qxbtr". The string is random; its second occurrence is
  predictable only by copying (induction).

Recall and copy are the classic probes of in-context use that separate attention from
fixed-state recurrences, so the same corpus serves to compare the zoo's architectures.

Every document is generated from its own RNG seeded by (seed, split, index): document i is the
same however many are asked for, and the train and validation splits are independent streams.
Validation additionally skips any document that also occurs in the train split (short copy
segments can collide), so the held-out loss is never measured on training text.

The rest of the module turns documents into training batches: `pack_tokens` concatenates them
into one token stream, `TokenBatches` draws seeded random windows from it (resumable through
`state_dict`), `sequential_windows` walks a held-out stream once, and `unigram_entropy` is the
yardstick a trained model's loss has to beat.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import random
import re
import string
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

SPLITS = ("train", "validation")

# ---------------------------------------------------------------------------------------------
# Synthetic corpus
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """How `synthetic_documents` generates the default corpus."""

    #: Base seed; every document is derived from (seed, split, index).
    seed: int = 0
    #: Relative weight of grammar documents (English-like sentences).
    grammar_weight: float = 0.6
    #: Relative weight of key-value recall documents.
    recall_weight: float = 0.2
    #: Relative weight of copy documents.
    copy_weight: float = 0.2
    #: Number of documents in the train split.
    train_docs: int = 20_000
    #: Number of documents in the validation (held-out) split.
    validation_docs: int = 500

    def __post_init__(self) -> None:
        weights = ("grammar_weight", "recall_weight", "copy_weight")
        for name in weights:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"CorpusConfig.{name} must be a finite number >= 0, got {value!r}")
        if sum(getattr(self, name) for name in weights) <= 0:
            raise ValueError(f"CorpusConfig weights ({', '.join(weights)}) must not all be zero")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"CorpusConfig.seed must be an integer, got {self.seed!r}")
        for name in ("train_docs", "validation_docs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"CorpusConfig.{name} must be an integer >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class _WordList:
    words: tuple[str, ...]
    # Cumulative, so that random.choices skips its own accumulation on every draw.
    cum_weights: tuple[float, ...]

    def pick(self, rng: random.Random) -> str:
        return rng.choices(self.words, cum_weights=self.cum_weights)[0]


def _zipf(words: str) -> _WordList:
    """Space-separated words in rough frequency order, the k-th drawn with weight 1/k.

    Skewed choices lower the entropy of each word the way natural text does.
    """
    ranked = tuple(words.split())
    return _WordList(
        ranked, tuple(itertools.accumulate(1.0 / k for k in range(1, len(ranked) + 1)))
    )


_NOUNS = _zipf(
    "cat dog bird fox horse rabbit mouse frog bear wolf lion duck goat owl snake farmer teacher "
    "king girl boy baby ball box tree house river garden table boat stone apple book lamp hill "
    "road cake flower city"
)
_TRANSITIVE_VERBS = _zipf(
    "see chase like watch carry find follow help push pull love catch hold touch want visit move "
    "wash fix hear greet miss feed paint draw"
)
_INTRANSITIVE_VERBS = _zipf("sleep run jump sing swim wait sit play fly rest hide dance")
_ADJECTIVES = _zipf(
    "big small red green blue old young happy sad quick slow tall bright dark quiet loud little "
    "brown white black warm cold soft clever lazy busy gentle angry tiny huge shy brave"
)
_PREPOSITIONS = _zipf(
    "in on under near behind beside above below across around inside over by from past toward "
    "along beyond with without"
)
# "a" is rewritten to "an" before a vowel; number-neutral determiners are in both lists.
_SINGULAR_DETERMINERS = _zipf("the a this that my every your our one each his her their")
_PLURAL_DETERMINERS = _zipf("the some these those my many two three your our several his her their")
_CONJUNCTIONS = _zipf("and but while because so when although")
# These read naturally after a comma; the others join clauses directly.
_COMMA_CONJUNCTIONS = frozenset({"but", "so"})


def _inflect(word: str) -> str:
    """Regular plural of a noun or third-person singular of a verb: box->boxes, fly->flies."""
    if word.endswith(("s", "sh", "ch", "x", "z", "o")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _noun_phrase(rng: random.Random, plural: bool, nested: bool = False) -> str:
    det = (_PLURAL_DETERMINERS if plural else _SINGULAR_DETERMINERS).pick(rng)
    num_adjectives = rng.choices((0, 1, 2), (5, 3, 1))[0]
    # dict.fromkeys drops a repeated adjective ("big big cat") while keeping the order.
    words = list(dict.fromkeys(_ADJECTIVES.pick(rng) for _ in range(num_adjectives)))
    noun = _NOUNS.pick(rng)
    words.append(_inflect(noun) if plural else noun)
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    phrase = " ".join([det, *words])
    # One level of nesting is enough for agreement across a phrase and keeps sentences short.
    if not nested and rng.random() < 0.2:
        phrase += " " + _prepositional_phrase(rng, nested=True)
    return phrase


def _prepositional_phrase(rng: random.Random, nested: bool = False) -> str:
    return f"{_PREPOSITIONS.pick(rng)} {_noun_phrase(rng, rng.random() < 0.3, nested)}"


def _clause(rng: random.Random) -> str:
    plural = rng.random() < 0.4
    subject = _noun_phrase(rng, plural)
    kind = rng.random()
    if kind < 0.55:
        verb = _TRANSITIVE_VERBS.pick(rng)
        obj = _noun_phrase(rng, rng.random() < 0.3)
        predicate = f"{verb if plural else _inflect(verb)} {obj}"
    elif kind < 0.8:
        verb = _INTRANSITIVE_VERBS.pick(rng)
        predicate = verb if plural else _inflect(verb)
    else:
        predicate = f"{'are' if plural else 'is'} {_ADJECTIVES.pick(rng)}"
    if rng.random() < 0.3:
        predicate += " " + _prepositional_phrase(rng)
    return f"{subject} {predicate}"


def sentence(rng: random.Random) -> str:
    text = _clause(rng)
    if rng.random() < 0.3:
        conj = _CONJUNCTIONS.pick(rng)
        joiner = f", {conj} " if conj in _COMMA_CONJUNCTIONS else f" {conj} "
        text += joiner + _clause(rng)
    return text[0].upper() + text[1:] + "."


def _grammar_document(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(1, 4)))


def _recall_document(rng: random.Random) -> str:
    # Distinct keys: a repeated key would make the answer ambiguous.
    num_keys = rng.randint(2, 6)
    keys: list[str] = []
    while len(keys) < num_keys:
        key = "".join(rng.choices(string.ascii_lowercase, k=2))
        if key not in keys:
            keys.append(key)
    values = {key: rng.randrange(100) for key in keys}
    queries = rng.sample(keys, k=rng.randint(1, min(3, len(keys))))
    context = " ".join(f"{key}={values[key]}" for key in keys)
    answers = " ".join(f"{key}? {values[key]}" for key in queries)
    return f"recall: {context} ; {answers}"


def _copy_document(rng: random.Random) -> str:
    text = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 10)))
    return f"copy: {text} | {text}"


_GENERATORS = (_grammar_document, _recall_document, _copy_document)


def _document(config: CorpusConfig, split: str, index: int) -> str:
    # A string seed is hashed with SHA-512 by random.Random, so it is stable across processes
    # and Python versions (unlike hash()) and gives every (seed, split, index) its own stream.
    rng = random.Random(f"zoo-corpus:{config.seed}:{split}:{index}")
    weights = (config.grammar_weight, config.recall_weight, config.copy_weight)
    generate = rng.choices(_GENERATORS, weights=weights)[0]
    return generate(rng)


@functools.lru_cache(maxsize=4)
def _train_documents(config: CorpusConfig) -> tuple[str, ...]:
    return tuple(_document(config, "train", i) for i in range(config.train_docs))


@functools.lru_cache(maxsize=4)
def _validation_documents(config: CorpusConfig) -> tuple[str, ...]:
    train = frozenset(_train_documents(config))
    docs: list[str] = []
    index = 0
    while len(docs) < config.validation_docs:
        doc = _document(config, "validation", index)
        if doc not in train:
            docs.append(doc)
        index += 1
    return tuple(docs)


def synthetic_documents(split: str, config: CorpusConfig = CorpusConfig()) -> list[str]:
    """The `split` ("train" or "validation") of the synthetic corpus described by `config`.

    Deterministic: document i depends only on (config.seed, split, i) and the mixture weights, so
    asking for more documents extends the list without changing its prefix. Validation documents
    never occur in the train split; since that is checked against the train split of the same
    config, validation also depends on ``config.train_docs``.
    """
    if split == "train":
        return list(_train_documents(config))
    if split == "validation":
        return list(_validation_documents(config))
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
# How a text file becomes documents (`data.documents` in a recipe): the whole file as one
# document, or one document per stretch between blank lines (each stretch kept as written).
DOCUMENT_SPLITS = ("file", "blank_lines")
TEXT_SUFFIXES_REFUSED = (".csv", ".tsv", ".parquet", ".arrow", ".json", ".gz", ".zip")


def data_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files named by `paths`: files as given, folders as every file below them in sorted
    order (hidden entries and `__pycache__` left out). Errors name the path."""
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found = [
                p
                for p in sorted(entry.rglob("*"))
                if p.is_file()
                and not any(
                    part.startswith(".") or part == "__pycache__"
                    for part in p.relative_to(entry).parts
                )
            ]
            if not found:
                raise ValueError(f"{entry}: a data folder with no files in it")
            files += found
        elif entry.is_file():
            files.append(entry)
        else:
            raise FileNotFoundError(f"{entry}: no such data file or folder")
    return files


def read_text_file(path: Path) -> str:
    """A file's text exactly as stored (UTF-8, line endings untouched); a binary file is an
    error naming it."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"{path}: a binary file (NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {error.start}: {data[error.start : error.start + 1]!r})"
        ) from None


def load_documents(
    path: str | Path, text_field: str = "text", documents: str = "file"
) -> list[str]:
    """The documents of a local file, verbatim: nothing is stripped or re-encoded.

    A ``.jsonl`` file holds one JSON object per line with the text under `text_field` (blank
    lines are skipped). Any other text file is one document (`documents="file"`) or one per
    stretch between blank lines (`"blank_lines"`; the blank lines themselves are dropped).
    Tabular or archive formats (``.csv``, ``.json``, ``.parquet``, ...) are refused; errors name
    the file and the 1-based line, e.g. ``ValueError("data.jsonl:3: invalid JSON: ...")``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return jsonl_texts(path, text_field)
    if suffix in TEXT_SUFFIXES_REFUSED:
        raise ValueError(
            f"{path}: unsupported file type {suffix!r}; give text files (.txt, source code, "
            "...) or .jsonl with a text field"
        )
    if documents not in DOCUMENT_SPLITS:
        raise ValueError(f"documents={documents!r} is not one of {list(DOCUMENT_SPLITS)}")
    text = read_text_file(path)
    if documents == "file":
        return [text] if text else []
    return [doc for doc in _BLANK_LINE.split(text) if doc.strip()]


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``"file:line"``, record) for each non-blank line of a .jsonl file; invalid JSON or a
    line that is not an object raises ValueError naming the file and the 1-based line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def jsonl_texts(path: str | Path, text_field: str, allow_empty: bool = True) -> list[str]:
    """The string `text_field` of every record of a .jsonl file; errors name file, line, field."""
    docs = []
    for where, record in iter_jsonl(path):
        if text_field not in record:
            raise ValueError(f"{where}: missing field {text_field!r}")
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(
                f"{where}: field {text_field!r} must be a string, got {type(text).__name__}"
            )
        if not text and not allow_empty:
            raise ValueError(f"{where}: field {text_field!r} is empty")
        docs.append(text)
    return docs


# ---------------------------------------------------------------------------------------------
# Token streams and batches
# ---------------------------------------------------------------------------------------------


def pack_tokens(documents: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Tokenize each document, start it with bos and end it with eos, and concatenate them all.

    Returns a 1-D LongTensor. The bos/eos boundaries let a model trained on random windows of the
    stream learn where documents start and end.
    """
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos token; pack_tokens needs one")
    if not documents:
        return torch.empty(0, dtype=torch.long)
    # verbose=False: a document longer than model_max_length is fine here (it is packed, never
    # fed whole), so transformers' warning about it would only be noise.
    encoded = tokenizer(list(documents), add_special_tokens=True, verbose=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        # Tokenizers differ in which specials they add themselves; add what is missing, once.
        if bos is not None and (not ids or ids[0] != bos):
            stream.append(bos)
        stream.extend(ids)
        if not ids or ids[-1] != eos:
            stream.append(eos)
    return torch.tensor(stream, dtype=torch.long)


def _check_stream(stream: torch.Tensor, seq_len: int) -> None:
    if stream.dim() != 1 or stream.dtype.is_floating_point or stream.dtype.is_complex:
        raise ValueError(
            f"stream must be a 1-D integer tensor, got shape {tuple(stream.shape)} {stream.dtype}"
        )
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")


class TokenBatches:
    """An endless, seeded iterator of random (batch_size, seq_len + 1) windows of a token stream.

    Each window is ``stream[s : s + seq_len + 1]`` for a start offset ``s`` drawn uniformly, so
    ``window[:, :-1]`` are inputs and ``window[:, 1:]`` their next-token targets. The draws come
    from a private `torch.Generator`; `state_dict` captures it together with the number of
    batches drawn, and `load_state_dict` restores both, so a resumed run sees exactly the batches
    the interrupted one would have seen next.
    """

    def __init__(self, stream: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0) -> None:
        _check_stream(stream, seq_len)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if stream.numel() <= seq_len + 1:
            raise ValueError(
                f"stream has {stream.numel()} tokens; it must be longer than "
                f"seq_len + 1 = {seq_len + 1}"
            )
        self.stream = stream.long()
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.step = 0
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len + 1)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        # Every start with a full window after it, the last one included.
        num_starts = self.stream.numel() - self.seq_len
        starts = torch.randint(num_starts, (self.batch_size,), generator=self.generator)
        self.step += 1
        return self.stream[starts[:, None] + self._offsets]

    def state_dict(self) -> dict[str, Any]:
        """The position (batches drawn so far) and the generator state."""
        return {"step": self.step, "seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; the next batch is the one that followed it."""
        missing = {"step", "seed", "generator"} - state.keys()
        if missing:
            raise KeyError(f"TokenBatches state is missing {sorted(missing)}")
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])


def sequential_windows(stream: torch.Tensor, seq_len: int) -> Iterator[torch.Tensor]:
    """Walk `stream` once in (1, seq_len + 1) windows for evaluation.

    Consecutive windows share one boundary token, so their targets (``window[:, 1:]``) do not
    overlap and together cover every token after the first exactly once. The last window is
    shorter when the stream does not divide evenly; a stream of fewer than two tokens yields
    nothing.
    """
    _check_stream(stream, seq_len)
    stream = stream.long()
    for start in range(0, stream.numel() - 1, seq_len):
        yield stream[start : start + seq_len + 1].unsqueeze(0)


def unigram_entropy(stream: torch.Tensor) -> float:
    """Entropy in nats of the empirical token distribution of `stream`.

    This is the loss of the best context-free predictor, so a model that learned anything from
    context must get below it.
    """
    if stream.numel() == 0:
        raise ValueError("unigram_entropy of an empty stream is undefined")
    counts = torch.bincount(stream.flatten().long())
    probs = counts[counts > 0].double() / stream.numel()
    return float(-(probs * probs.log()).sum())


# ---------------------------------------------------------------------------------------------
# Training data: packed sequences in epochs, sharded across processes, resumable
# ---------------------------------------------------------------------------------------------


class PackedSequences:
    """Endless micro-batches of packed (seq_len + 1)-token windows, epoch by epoch.

    The stream (documents joined with bos/eos boundaries, see `pack_tokens`) is cut into
    non-overlapping windows ``stream[i·T : i·T + T + 1]`` (consecutive windows share one boundary
    token, so every token is a target exactly once per epoch). Each epoch visits the windows in a
    fresh order drawn from (seed, epoch). One *global* micro-batch is `micro_batch_size ×
    world_size` consecutive windows of that order; process `rank` takes its own slice, so the
    processes see disjoint data and together see what one process with a world-sized batch
    would. An epoch's tail shorter than one global micro-batch is skipped.

    The position (epoch, windows consumed) is the whole state: `state_dict` / `load_state_dict`
    resume mid-epoch exactly, and the state is the same on every rank. `stream` may be a torch
    tensor or a numpy array (e.g. a memory-mapped token cache); only the windows drawn are read.
    """

    def __init__(
        self,
        stream: Any,
        seq_len: int,
        micro_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(
                f"seq_len={seq_len} and micro_batch_size={micro_batch_size} must be >= 1"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.stream = stream
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_windows = (len(stream) - 1) // seq_len
        self.global_batch = micro_batch_size * world_size
        if self.num_windows < self.global_batch:
            raise ValueError(
                f"the token stream has {len(stream):,} tokens: {self.num_windows} windows of "
                f"{seq_len} + 1, fewer than one global micro-batch of micro_batch_size × "
                f"processes = {self.global_batch}; give more data or a smaller batch"
            )
        self.epoch = 0
        self.position = 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.num_windows, generator=generator)
        return self._order

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self.position + self.global_batch > self.num_windows:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        start = self.position + self.rank * self.micro_batch_size
        windows = self._epoch_order()[start : start + self.micro_batch_size].tolist()
        self.position += self.global_batch
        rows = [self._window(i) for i in windows]
        return torch.stack(rows)

    def _window(self, index: int) -> torch.Tensor:
        start = index * self.seq_len
        window = self.stream[start : start + self.seq_len + 1]
        if isinstance(window, torch.Tensor):
            return window.long()
        return torch.from_numpy(np.asarray(window, dtype=np.int64))

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / self.num_windows

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"data state was saved with seed {state['seed']}, this run uses {self.seed}"
            )
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_token_stream(
    files: Sequence[str | Path],
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | Path,
    text_field: str = "text",
    documents: str = "file",
) -> np.ndarray:
    """The packed token stream of local data `files` (files or folders, see `data_files`),
    tokenized once.

    The first call writes ``<cache_dir>/<key>.npy`` (uint16 when the vocabulary fits, else
    uint32; written to a temporary name and renamed, so a crash never leaves half a cache) and
    every call returns it memory-mapped. The key hashes the files' paths, sizes and modification
    times, the tokenizer and how files split into documents, so an edited file or another
    tokenizer makes a new cache. No documents at all is an error naming the files.
    """
    paths = data_files(files)
    key_parts = [tokenizer_fingerprint(tokenizer), text_field, documents]
    for path in paths:
        stat = path.stat()
        key_parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:24]
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / f"{key}.npy"
    if not target.is_file():
        docs = [doc for path in paths for doc in load_documents(path, text_field, documents)]
        if not docs:
            names = ", ".join(str(f) for f in files)
            raise ValueError(f"{names}: no documents (every file is empty)")
        stream = pack_tokens(docs, tokenizer).numpy()
        dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".{key}.{os.getpid()}.tmp.npy"
        np.save(tmp, stream.astype(dtype))
        os.replace(tmp, target)
    return np.load(target, mmap_mode="r")


class StreamedSequences:
    """Packed (micro_batch_size, seq_len + 1) windows from an iterable of texts (e.g. a streamed
    HF `datasets` split), for corpora too large to cache.

    Documents are tokenized and packed on the fly into windows of seq_len + 1 with stride seq_len;
    window i goes to process i mod world_size. The state is the number of windows this process
    has consumed; resuming re-reads the (seeded, hence identical) stream and skips them, which
    costs tokenization time but no storage.
    """

    def __init__(
        self,
        texts: Callable[[], Iterable[str]],
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.texts, self.tokenizer = texts, tokenizer
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.consumed = 0
        self._windows: Iterator[torch.Tensor] | None = None

    def _all_windows(self) -> Iterator[torch.Tensor]:
        buffer: list[int] = []
        index = 0
        while True:
            for text in self.texts():
                buffer.extend(pack_tokens([text], self.tokenizer).tolist())
                while len(buffer) > self.seq_len:
                    window = torch.tensor(buffer[: self.seq_len + 1])
                    del buffer[: self.seq_len]
                    if index % self.world_size == self.rank:
                        yield window
                    index += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._windows is None:
            self._windows = self._all_windows()
            for _ in range(self.consumed):
                next(self._windows)
        rows = [next(self._windows) for _ in range(self.micro_batch_size)]
        self.consumed += self.micro_batch_size
        return torch.stack(rows)

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed, self._windows = int(state["consumed"]), None
