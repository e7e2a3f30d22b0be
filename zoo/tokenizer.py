"""The embedded default tokenizer: raw UTF-8 bytes plus three special tokens.

Every model in the zoo ships with a tokenizer so that a saved checkpoint is self-contained. The
default one is byte-level because it needs no training and no download, encodes any text
losslessly (there is no unknown token), and keeps the vocabulary at 259 entries, so the embedding
and output layers of a small CPU model stay tiny. The price is longer sequences (one token per
byte), which is fine for the short synthetic corpus in `zoo.data`.

Layout: ids 0..255 are the byte values themselves (id == byte), then 256 ``<s>`` (bos), 257
``</s>`` (eos) and 258 ``<pad>``. Encoding prepends bos and never appends eos (documents are
closed with eos by `zoo.data.pack_tokens`). Padding goes on the left, as decoder-only generation
wants.

It is an ordinary `tokenizers` BPE model with the 256-symbol ByteLevel alphabet and no merges,
wrapped as a transformers `PreTrainedTokenizerFast`, so `save_pretrained` writes a plain
``tokenizer.json`` + ``tokenizer_config.json`` that ``AutoTokenizer.from_pretrained`` reloads in
a process that never imports zoo.
"""

from __future__ import annotations

import functools
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 259

# Long enough never to truncate a packed document; the model's context length is what limits
# a forward pass, not the tokenizer.
MODEL_MAX_LENGTH = 1 << 20


def _byte_to_symbol() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet the ByteLevel pre-tokenizer emits.

    Printable Latin-1 bytes stand for themselves; the others are shifted above U+0100 so that no
    byte maps to whitespace or a control character.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for offset, b in enumerate(shifted):
        table[b] = chr(256 + offset)
    return table


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    # Vocabulary in byte order with no merges: BPE then maps each byte to its own id.
    vocab = {symbol: byte for byte, symbol in sorted(_byte_to_symbol().items())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: the byte stream must be the text, nothing added.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN, PAD_TOKEN])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    return tok.to_str()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build the byte tokenizer; each call returns a new, independent object.

    Only the serialized ``tokenizer.json`` is cached, so callers may mutate what they get (set
    padding, truncation, ...) without affecting anyone else.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        model_max_length=MODEL_MAX_LENGTH,
        # transformers' clean-up would delete the space in "a ." and break the exact round trip.
        clean_up_tokenization_spaces=False,
        # Text that happens to contain "<s>" is encoded as its bytes, so any string round-trips;
        # the special ids only ever come from the post-processor or from pack_tokens.
        split_special_tokens=True,
    )


def _looks_like_local_path(name_or_path: str) -> bool:
    # A hub id is "name" or "org/name"; anything rooted, relative-dotted, home-relative or with
    # more than one separator can only be a local path.
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    return (
        name_or_path.startswith((".", "~", *seps)) or sum(name_or_path.count(s) for s in seps) > 1
    )


# Files any transformers tokenizer folder has at least one of.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    """Return the byte tokenizer for None, else ``AutoTokenizer.from_pretrained(name_or_path)``.

    Any Hugging Face tokenizer directory (or hub id, when the hub is reachable) works. A string
    that can only be a local path and does not exist raises FileNotFoundError naming it, rather
    than transformers' hub lookup error.
    """
    if name_or_path is None:
        return byte_tokenizer()
    path = os.path.expanduser(name_or_path)
    if not os.path.exists(path) and _looks_like_local_path(name_or_path):
        raise FileNotFoundError(f"tokenizer path {name_or_path!r} does not exist")
    if os.path.isdir(path) and not any(
        os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES
    ):
        raise FileNotFoundError(
            f"{path}: no tokenizer in this folder (looked for {', '.join(TOKENIZER_FILES)}); "
            "save one with tokenizer.save_pretrained(path), or pass the tokenizer's own path"
        )
    return AutoTokenizer.from_pretrained(path)
