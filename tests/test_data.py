"""Tests for the embedded synthetic corpus, local file loading and batching (zoo.data)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.data import (
    _INTRANSITIVE_VERBS,
    _NOUNS,
    _TRANSITIVE_VERBS,
    CorpusConfig,
    PackedSequences,
    StreamedSequences,
    TokenBatches,
    _document,
    _inflect,
    cached_token_stream,
    load_documents,
    pack_tokens,
    sequential_windows,
    synthetic_documents,
    unigram_entropy,
)
from zoo.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, byte_tokenizer

SMALL = CorpusConfig(train_docs=300, validation_docs=50)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def default_streams(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed train and validation streams of the default corpus."""
    return (
        pack_tokens(synthetic_documents("train"), tok),
        pack_tokens(synthetic_documents("validation"), tok),
    )


def _kind(doc: str) -> str:
    return doc.split(":", 1)[0] if doc.startswith(("recall:", "copy:")) else "grammar"


# --- synthetic corpus -------------------------------------------------------------------------


def test_deterministic_by_seed() -> None:
    assert synthetic_documents("train", SMALL) == synthetic_documents("train", SMALL)
    other = synthetic_documents("train", CorpusConfig(seed=1, train_docs=300))
    assert other != synthetic_documents("train", SMALL)
    assert len(set(other) & set(synthetic_documents("train", SMALL))) < 30


def test_document_i_does_not_depend_on_count() -> None:
    ten = synthetic_documents("train", CorpusConfig(train_docs=10))
    hundred = synthetic_documents("train", CorpusConfig(train_docs=100))
    assert len(ten) == 10 and len(hundred) == 100
    assert hundred[:10] == ten
    val_few = synthetic_documents("validation", CorpusConfig(train_docs=100, validation_docs=10))
    val_many = synthetic_documents("validation", CorpusConfig(train_docs=100, validation_docs=60))
    assert val_many[:10] == val_few


def test_train_and_validation_are_disjoint() -> None:
    # Short copy documents ("copy: abc | abc") make collisions between the independent train and
    # validation streams likely; the validation split must skip them.
    config = CorpusConfig(grammar_weight=0, recall_weight=0)
    train = set(synthetic_documents("train", config))
    validation = synthetic_documents("validation", config)
    assert len(validation) == config.validation_docs
    assert not train & set(validation)
    raw = [_document(config, "validation", i) for i in range(config.validation_docs)]
    assert sum(doc in train for doc in raw) > 0, "no collisions: the filter went untested"


def test_default_splits_are_disjoint() -> None:
    assert not set(synthetic_documents("train")) & set(synthetic_documents("validation"))


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match=r"'train', 'validation'.*'test'"):
        synthetic_documents("test", SMALL)


def test_mixture_contains_all_kinds_in_proportion() -> None:
    kinds = [_kind(doc) for doc in synthetic_documents("train", CorpusConfig(train_docs=2000))]
    shares = {kind: kinds.count(kind) / len(kinds) for kind in ("grammar", "recall", "copy")}
    assert shares["grammar"] == pytest.approx(0.6, abs=0.05)
    assert shares["recall"] == pytest.approx(0.2, abs=0.05)
    assert shares["copy"] == pytest.approx(0.2, abs=0.05)
    only_copy = CorpusConfig(grammar_weight=0, recall_weight=0, train_docs=50)
    assert {_kind(doc) for doc in synthetic_documents("train", only_copy)} == {"copy"}


def test_grammar_documents_look_like_sentences() -> None:
    grammar = [d for d in synthetic_documents("train", SMALL) if _kind(d) == "grammar"]
    sentence = re.compile(r"[A-Z][a-z]*(,? [a-z]+)*\.")
    nouns = set(_NOUNS.words)
    plural_nouns = {_inflect(n) for n in nouns}
    verbs = {*_TRANSITIVE_VERBS.words, *_INTRANSITIVE_VERBS.words, "are"}
    verbs_3sg = {*map(_inflect, verbs - {"are"}), "is"}
    checked = 0
    for doc in grammar:
        sentences = re.findall(r"[^.]+\.", doc)
        assert 1 <= len(sentences) <= 4, doc
        for text in sentences:
            assert sentence.fullmatch(text.strip()), text
            words = text.strip(" .").lower().split()
            # The subject's head noun is the first noun; when the verb follows it directly, the
            # two must agree in number.
            head = next(i for i, w in enumerate(words) if w in nouns | plural_nouns)
            following = words[head + 1].rstrip(",")
            if following in verbs | verbs_3sg:
                assert (words[head] in nouns) == (following in verbs_3sg), text
                checked += 1
    assert checked > 100
    text = " ".join(grammar).lower()
    assert " an " in text
    assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", text)


def test_recall_segments_are_self_consistent() -> None:
    recalls = [d for d in synthetic_documents("train", SMALL) if _kind(d) == "recall"]
    assert len(recalls) > 20
    for doc in recalls:
        context, queries = doc.removeprefix("recall: ").split(" ; ")
        pairs = dict(item.split("=") for item in context.split())
        assert 2 <= len(pairs) == len(context.split()) <= 6, doc
        asked = re.findall(r"([a-z]{2})\? (\d+)", queries)
        assert asked and len(asked) == len(queries.split()) // 2, doc
        for key, answer in asked:
            assert pairs[key] == answer, doc


def test_copy_segments_are_self_consistent() -> None:
    copies = [d for d in synthetic_documents("train", SMALL) if _kind(d) == "copy"]
    assert len(copies) > 20
    for doc in copies:
        match = re.fullmatch(r"copy: ([a-z]+) \| ([a-z]+)", doc)
        assert match and match[1] == match[2], doc


def test_default_corpus_has_learnable_structure(default_streams) -> None:
    train, validation = default_streams
    entropy = unigram_entropy(train)
    assert 2.0 < entropy < 5.5
    # A byte bigram model fitted on train (add-0.1 smoothing) must beat the unigram entropy on
    # held-out text by a clear margin: there is local structure to learn.
    pair_ids = train[:-1] * VOCAB_SIZE + train[1:]
    counts = torch.bincount(pair_ids, minlength=VOCAB_SIZE**2).double().view(VOCAB_SIZE, -1)
    log_probs = (counts + 0.1).log() - (counts + 0.1).sum(1, keepdim=True).log()
    bigram_ce = -log_probs[validation[:-1], validation[1:]].mean().item()
    assert bigram_ce < entropy - 0.5


def test_corpus_config_validation_names_the_field() -> None:
    for field, value in [
        ("train_docs", -1),
        ("validation_docs", -5),
        ("grammar_weight", -0.1),
        ("recall_weight", float("nan")),
        ("copy_weight", float("inf")),
        ("seed", 1.5),
    ]:
        with pytest.raises(ValueError, match=field):
            CorpusConfig(**{field: value})
    with pytest.raises(ValueError, match="grammar_weight, recall_weight, copy_weight"):
        CorpusConfig(grammar_weight=0, recall_weight=0, copy_weight=0)


# --- local files --------------------------------------------------------------------------------


def test_a_text_file_is_one_document_kept_verbatim(tmp_path: Path) -> None:
    text = "    indented first line\r\n\n\n  \nsecond part\n\nthird é\n"
    path = tmp_path / "docs.txt"
    path.write_bytes(text.encode("utf-8"))
    assert load_documents(path) == [text]  # CRLF, leading blanks, trailing newline: all kept
    assert load_documents(path, documents="blank_lines") == [
        "    indented first line\r",
        "second part",
        "third é\n",
    ]
    (tmp_path / "empty.txt").write_text("")
    assert load_documents(tmp_path / "empty.txt") == []


def test_binary_and_non_utf8_files_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match=r"weights\.bin: a binary file"):
        load_documents(tmp_path / "weights.bin")
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt: not UTF-8 text"):
        load_documents(tmp_path / "latin.txt")


def test_a_data_folder_is_every_file_in_it_except_hidden_and_caches(tmp_path: Path) -> None:
    from zoo.data import data_files

    for name in ("b/two.py", "a.py", ".git/config", "b/__pycache__/two.cpython.pyc"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    assert [p.relative_to(tmp_path).as_posix() for p in data_files([tmp_path])] == [
        "a.py",
        "b/two.py",
    ]
    with pytest.raises(FileNotFoundError, match="nowhere: no such data file or folder"):
        data_files([tmp_path / "nowhere"])


def test_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    records = [{"text": "one", "id": 1}, {"text": "two 中文"}, {"body": "three", "text": ""}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    assert load_documents(path) == ["one", "two 中文", ""]


def test_load_jsonl_custom_field(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "a"}\n{"body": "b"}\n', encoding="utf-8")
    assert load_documents(str(path), text_field="body") == ["a", "b"]


def test_load_jsonl_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.jsonl:3: invalid JSON"):
        load_documents(path)


def test_load_jsonl_missing_field_names_field_and_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"content": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.jsonl:2: missing field 'text'"):
        load_documents(path)
    path.write_text('{"text": "a"}\n[1, 2]\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.jsonl:2: expected a JSON object"):
        load_documents(path)


def test_load_missing_file_and_unknown_type(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_documents(missing)
    other = tmp_path / "docs.csv"
    other.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"docs\.csv: unsupported file type '\.csv'"):
        load_documents(other)


# --- packing and batching -----------------------------------------------------------------------


def test_pack_tokens_frames_documents(tok) -> None:
    stream = pack_tokens(["ab", "", "é"], tok)
    assert stream.dtype == torch.long and stream.dim() == 1
    expected = [BOS_ID, 97, 98, EOS_ID, BOS_ID, EOS_ID, BOS_ID, 0xC3, 0xA9, EOS_ID]
    assert stream.tolist() == expected
    assert pack_tokens([], tok).numel() == 0


def test_unigram_entropy() -> None:
    assert unigram_entropy(torch.tensor([5, 5, 5])) == pytest.approx(0.0)
    assert unigram_entropy(torch.tensor([0, 1, 2, 3])) == pytest.approx(
        torch.log(torch.tensor(4.0))
    )
    with pytest.raises(ValueError):
        unigram_entropy(torch.tensor([], dtype=torch.long))


def test_token_batches_shapes_and_windows() -> None:
    stream = torch.arange(1000)
    batches = TokenBatches(stream, batch_size=4, seq_len=16, seed=0)
    for _ in range(5):
        batch = next(batches)
        assert batch.shape == (4, 17) and batch.dtype == torch.long
        # Windows are contiguous slices of the stream.
        assert torch.equal(batch - batch[:, :1], torch.arange(17).expand(4, -1))
        assert batch.max() < 1000
    assert batches.step == 5


def test_token_batches_reach_both_ends() -> None:
    stream = torch.arange(12)
    batches = TokenBatches(stream, batch_size=64, seq_len=10)
    starts = {int(b[0]) for _ in range(4) for b in next(batches)}
    assert starts == {0, 1}


def test_token_batches_deterministic_by_seed() -> None:
    stream = torch.randint(0, 259, (5000,), generator=torch.Generator().manual_seed(0))
    first, second = TokenBatches(stream, 8, 32, seed=3), TokenBatches(stream, 8, 32, seed=3)
    other = TokenBatches(stream, 8, 32, seed=4)
    for _ in range(3):
        x = next(first)
        assert torch.equal(x, next(second))
        assert not torch.equal(x, next(other))


def test_token_batches_resume_from_state_dict() -> None:
    stream = torch.randint(0, 259, (5000,), generator=torch.Generator().manual_seed(0))
    run = TokenBatches(stream, 4, 32, seed=7)
    for _ in range(3):
        next(run)
    state = run.state_dict()
    expected = [next(run) for _ in range(4)]
    resumed = TokenBatches(stream, 4, 32, seed=0)
    resumed.load_state_dict(state)
    assert resumed.step == 3
    assert all(torch.equal(x, next(resumed)) for x in expected)
    # The state survives a torch.save round trip, as in a checkpoint.
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    buffer.seek(0)
    again = TokenBatches(stream, 4, 32)
    again.load_state_dict(torch.load(buffer))
    assert torch.equal(next(again), next(run))
    with pytest.raises(KeyError, match="generator"):
        again.load_state_dict({"step": 0, "seed": 0})


def test_token_batches_validation() -> None:
    with pytest.raises(ValueError, match=r"17 tokens.*seq_len \+ 1 = 17"):
        TokenBatches(torch.arange(17), batch_size=2, seq_len=16)
    with pytest.raises(ValueError, match="batch_size"):
        TokenBatches(torch.arange(100), batch_size=0, seq_len=16)
    with pytest.raises(ValueError, match="seq_len"):
        TokenBatches(torch.arange(100), batch_size=2, seq_len=0)
    with pytest.raises(ValueError, match="1-D integer"):
        TokenBatches(torch.zeros(100), batch_size=2, seq_len=16)


def test_sequential_windows_cover_targets_once() -> None:
    stream = torch.arange(23)
    windows = list(sequential_windows(stream, seq_len=5))
    assert [w.shape for w in windows] == [(1, 6)] * 4 + [(1, 3)]
    targets = torch.cat([w[0, 1:] for w in windows])
    assert torch.equal(targets, stream[1:])
    inputs = torch.cat([w[0, :-1] for w in windows])
    assert torch.equal(inputs, stream[:-1])
    assert [w.shape for w in sequential_windows(torch.arange(11), 5)] == [(1, 6), (1, 6)]
    assert list(sequential_windows(torch.arange(1), 5)) == []


def test_default_stream_batches_end_to_end(default_streams) -> None:
    train, validation = default_streams
    batch = next(TokenBatches(train, batch_size=2, seq_len=64))
    assert batch.shape == (2, 65) and batch.min() >= 0 and batch.max() < VOCAB_SIZE
    assert sum(w.shape[1] - 1 for w in sequential_windows(validation, 64)) == len(validation) - 1


# ---------------------------------------------------------------------------------------------
# Training data: packed sequences, token caches, streams


def test_packed_sequences_shard_disjointly_and_cover_what_one_process_sees():
    stream = torch.arange(1000)
    single = PackedSequences(stream, seq_len=10, micro_batch_size=4, seed=3)
    ranks = [PackedSequences(stream, 10, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(30):  # several epochs of 99 windows
        expected = next(single)
        got = torch.cat([next(r) for r in ranks])
        assert torch.equal(got, expected)
    window = expected[0]
    assert window.numel() == 11 and torch.equal(window, torch.arange(window[0], window[0] + 11))
    assert int(window[0]) % 10 == 0  # windows start on the seq_len grid


def test_packed_sequences_visit_each_window_once_per_epoch():
    data = PackedSequences(torch.arange(101), seq_len=10, micro_batch_size=5, seed=0)
    starts = [int(row[0]) for _ in range(2) for row in next(data)]
    assert sorted(starts) == list(range(0, 100, 10))
    assert data.epoch == 0 and data.epochs_done == 1.0
    next(data)
    assert data.epoch == 1


def test_packed_sequences_resume_mid_epoch():
    stream = torch.arange(5000)
    data = PackedSequences(stream, 16, 4, seed=1)
    for _ in range(37):
        next(data)
    state = data.state_dict()
    expected = [next(data) for _ in range(90)]
    resumed = PackedSequences(stream, 16, 4, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)) for a in expected)
    with pytest.raises(ValueError, match="seed 1, this run uses 2"):
        PackedSequences(stream, 16, 4, seed=2).load_state_dict(state)


def test_packed_sequences_need_one_global_batch():
    with pytest.raises(ValueError, match="fewer than one global micro-batch"):
        PackedSequences(torch.arange(50), seq_len=10, micro_batch_size=4, world_size=2)


def test_token_cache_is_written_once_and_follows_the_file(tmp_path):
    tokenizer = byte_tokenizer()
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "hello"}\n{"text": "world"}\n')
    cache = tmp_path / "cache"
    stream = cached_token_stream([data], tokenizer, cache)
    assert stream.dtype == np.uint16
    expected = pack_tokens(["hello", "world"], tokenizer)
    assert torch.equal(torch.from_numpy(np.asarray(stream, dtype=np.int64)), expected)
    (entry,) = cache.glob("*.npy")
    mtime = entry.stat().st_mtime_ns
    cached_token_stream([data], tokenizer, cache)
    assert entry.stat().st_mtime_ns == mtime and len(list(cache.glob("*.npy"))) == 1
    data.write_text('{"text": "changed"}\n')
    changed = cached_token_stream([data], tokenizer, cache)
    assert len(list(cache.glob("*.npy"))) == 2 and len(changed) == len("changed") + 2
    with pytest.raises(FileNotFoundError, match=r"missing\.txt: no such data file"):
        cached_token_stream([tmp_path / "missing.txt"], tokenizer, cache)


def test_streamed_sequences_pack_shard_and_resume():
    tokenizer = byte_tokenizer()
    texts = [f"document number {i} " * 3 for i in range(40)]
    make = lambda rank=0, world=1: StreamedSequences(
        lambda: iter(texts), tokenizer, seq_len=16, micro_batch_size=2, rank=rank, world_size=world
    )
    single, ranks = make(), [make(0, 2), make(1, 2)]
    first, second = next(single), next(single)  # windows 0, 1 and 2, 3
    # Window i goes to process i mod 2: rank 0 gets windows 0 and 2, rank 1 gets 1 and 3.
    assert torch.equal(next(ranks[0]), torch.stack([first[0], second[0]]))
    assert torch.equal(next(ranks[1]), torch.stack([first[1], second[1]]))
    data = make()
    for _ in range(3):
        next(data)
    state = data.state_dict()
    upcoming = [next(data) for _ in range(4)]
    resumed = make()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)) for a in upcoming)
    stream = pack_tokens(texts, tokenizer)
    first = make()
    assert torch.equal(next(first)[0], stream[:17])
