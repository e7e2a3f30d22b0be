"""Sliding-window perplexity of a causal LM over local text, with lm-eval's wikitext metrics.

Each document is encoded without special tokens and preceded by the tokenizer's BOS (else EOS),
which only conditions the first token: every text token is scored exactly once. Documents
longer than the model's window are cut into strided windows (transformers' documented
"perplexity of fixed-length models" method): each forward pass sees at most ``context`` tokens
and scores only its last ``stride`` tokens (the first window scores all of its tokens), so every
token after the first window is predicted from at least ``context - stride + 1`` tokens of
history. ``stride == context`` gives disjoint windows and reproduces lm-eval's
``loglikelihood_rolling`` (lm-eval's HFLM with ``add_bos_token=False``; with its default it also
scores a tokenizer-added BOS after the BOS prefix, which we do not count).

Metrics, aggregated over all documents as lm-eval's wikitext task does (total log-likelihood
divided by total units):

* ``token_perplexity`` = exp(-LL / tokens)
* ``word_perplexity`` = exp(-LL / words), words = ``len(re.split(r"\\s+", doc))`` (lm-eval's
  ``count_words``; a trailing newline counts as one more word, as there)
* ``byte_perplexity`` = exp(-LL / UTF-8 bytes), ``bits_per_byte`` = -LL / bytes / ln 2.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from zoo.data import jsonl_texts
from zoo.eval.commonsense import encode, model_device, prefix_token_id, resolve_max_length


def read_documents(path: str | os.PathLike[str], field: str = "text") -> list[str]:
    """Documents of a ``.txt`` file (the whole file is one) or a ``.jsonl`` file (one per line).

    jsonl lines are objects whose ``field`` holds the text; blank lines are skipped. Invalid JSON,
    a missing, non-string or empty field, or an empty file raise ValueError naming ``file:line``
    and the field; a missing file raises FileNotFoundError.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"perplexity data file {path!r} does not exist")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text:
            raise ValueError(f"{path}: the file is empty")
        return [text]
    if not path.endswith(".jsonl"):
        raise ValueError(f"{path}: expected a .txt or .jsonl file")
    docs = jsonl_texts(path, field, allow_empty=False)
    if not docs:
        raise ValueError(f"{path}: no documents (the file is empty)")
    return docs


def _windows(n_tokens: int, context: int, stride: int) -> Iterable[tuple[int, int, int]]:
    """``(start, first_target, end)`` over a sequence ``[prefix] + tokens`` of n_tokens + 1.

    The window feeds positions ``start .. end - 1`` and scores targets ``first_target .. end``
    (each input position predicts the next one); targets 1 .. n_tokens are each scored once.
    """
    last = n_tokens  # index of the last target in the prefixed sequence
    end = min(context, last)
    yield 0, 1, end
    while end < last:
        first = end + 1
        end = min(end + stride, last)
        yield max(0, end - context), first, end


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    path_or_texts: str | os.PathLike[str] | Sequence[str],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    field: str = "text",
    progress: bool = True,
) -> dict[str, float]:
    """Perplexity metrics of ``model`` on a .txt/.jsonl file or a list of document strings.

    ``context`` defaults to the longest input lm-eval would use (the config's
    ``max_position_embeddings``), ``stride`` to ``context // 2``; ``batch_size`` windows go
    through the model at once (1 by default: a full window's logits can be large). Returns
    ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``, ``token_perplexity`` and the
    totals they come from (``loglikelihood``, ``tokens``, ``words``, ``bytes``, ``documents``).
    """
    if isinstance(path_or_texts, (str, os.PathLike)):
        docs = read_documents(path_or_texts, field=field)
    else:
        docs = list(path_or_texts)
        for i, doc in enumerate(docs):
            if not isinstance(doc, str) or not doc:
                raise ValueError(f"document {i} must be a non-empty string, got {doc!r}")
        if not docs:
            raise ValueError("no documents to score")
    context = context or resolve_max_length(model, tokenizer)
    stride = stride or max(1, context // 2)
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    prefix = prefix_token_id(tokenizer)
    jobs = []  # (input ids, targets): targets are the last len(targets) inputs' next tokens
    n_tokens = 0
    for doc in docs:
        seq = [prefix, *encode(tokenizer, doc, add_special_tokens=False)]
        n_tokens += len(seq) - 1
        for start, first, end in _windows(len(seq) - 1, context, stride):
            jobs.append((seq[start:end], seq[first : end + 1]))

    total = 0.0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            tqdm(total=len(jobs), desc="perplexity", disable=not progress) as bar,
        ):
            for i in range(0, len(jobs), batch_size):
                batch = jobs[i : i + batch_size]
                width = max(len(inp) for inp, _ in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                for row, (inp, _) in enumerate(batch):
                    ids[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
                logits = model(input_ids=ids.to(device)).logits
                for row, (inp, targets) in enumerate(batch):
                    scored = logits[row, len(inp) - len(targets) : len(inp)].float()
                    logprobs = F.log_softmax(scored, dim=-1)
                    target = torch.tensor(targets, device=logprobs.device).unsqueeze(-1)
                    total += float(logprobs.gather(-1, target).sum())
                bar.update(len(batch))
    finally:
        model.train(was_training)

    words = sum(len(re.split(r"\s+", doc)) for doc in docs)
    n_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    return {
        "word_perplexity": math.exp(-total / words),
        "byte_perplexity": math.exp(-total / n_bytes),
        "bits_per_byte": -total / n_bytes / math.log(2),
        "token_perplexity": math.exp(-total / n_tokens),
        "loglikelihood": total,
        "tokens": n_tokens,
        "words": words,
        "bytes": n_bytes,
        "documents": len(docs),
    }
