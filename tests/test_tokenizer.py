"""Tests for the embedded byte tokenizer (zoo.tokenizer)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tokenizers.pre_tokenizers import ByteLevel

from zoo.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    byte_tokenizer,
    load_tokenizer,
)

TEXTS = [
    "hello world",
    "  spaces , and punctuation .  ",
    "tabs\tand\nnewlines\r\n",
    "café naïve",
    "中文 日本語 한국어",
    "emoji 😀👍🏽",
    "literal <s> and </s> and <pad>",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text: str) -> None:
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("text", TEXTS)
def test_ids_are_bytes_after_bos(tok, text: str) -> None:
    # Literal "<s>" in text is encoded as bytes too: only the post-processor emits special ids.
    assert tok(text)["input_ids"] == [BOS_ID, *text.encode("utf-8")]


def test_byte_ids_cover_the_byte_alphabet(tok) -> None:
    byte_symbols = {s: i for s, i in tok.get_vocab().items() if i < 256}
    assert sorted(byte_symbols.values()) == list(range(256))
    assert set(byte_symbols) == set(ByteLevel.alphabet())
    # Every code point up to U+07FF plus 3- and 4-byte ones: all valid UTF-8 lead/continuation
    # bytes appear, and each encodes to its own value.
    text = "".join(map(chr, range(0x800))) + "\u4e2d\uffff\U0001f600\U0010ffff"
    assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_special_tokens(tok) -> None:
    assert VOCAB_SIZE == len(tok) == 259
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert (BOS_ID, EOS_ID, PAD_ID) == (256, 257, 258)
    assert tok.convert_ids_to_tokens([BOS_ID, EOS_ID, PAD_ID]) == ["<s>", "</s>", "<pad>"]
    assert tok("a", add_special_tokens=False)["input_ids"] == [ord("a")]


def test_left_padding(tok) -> None:
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert tok.padding_side == "left"
    assert batch["input_ids"].tolist() == [
        [PAD_ID, PAD_ID, BOS_ID, 97, 98],
        [BOS_ID, 97, 98, 99, 100],
    ]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_each_call_returns_an_independent_tokenizer() -> None:
    a, b = byte_tokenizer(), byte_tokenizer()
    a.padding_side = "right"
    assert a is not b and b.padding_side == "left"


def test_reload_in_fresh_process_without_zoo(tok, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert (tmp_path / "tokenizer_config.json").is_file()
    script = textwrap.dedent(
        f"""
        import json, sys
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(tmp_path)!r})
        texts = json.loads(sys.stdin.read())
        ids = [tok(t)["input_ids"] for t in texts]
        padded = tok(texts[:2], padding=True)["input_ids"]
        assert "zoo" not in sys.modules
        print(json.dumps({{"ids": ids, "padded": padded, "special": [
            tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(TEXTS),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["ids"] == [tok(t)["input_ids"] for t in TEXTS]
    assert out["padded"] == tok(TEXTS[:2], padding=True)["input_ids"]
    assert out["special"] == [BOS_ID, EOS_ID, PAD_ID]


def test_load_tokenizer_default_and_directory(tok, tmp_path: Path) -> None:
    assert load_tokenizer(None)("é")["input_ids"] == [BOS_ID, 0xC3, 0xA9]
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path))("é")["input_ids"] == [BOS_ID, 0xC3, 0xA9]


@pytest.mark.parametrize("name", ["missing-dir", "./missing-dir", "a/b/missing"])
def test_load_tokenizer_missing_path_names_it(tmp_path: Path, name: str) -> None:
    path = str(tmp_path / name) if name == "missing-dir" else name
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        load_tokenizer(path)
