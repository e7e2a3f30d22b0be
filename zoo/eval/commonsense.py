"""Zero-shot multiple-choice commonsense tasks scored exactly as lm-evaluation-harness 0.4 does.

Each question becomes one ``(context, continuation)`` pair per answer choice; the model scores
each pair by the summed log-probability of the continuation tokens, and

* ``acc`` is 1 when the choice with the highest log-likelihood is the gold one;
* ``acc_norm`` divides each log-likelihood by the length *in characters* of lm-eval's choice
  string (``doc_to_choice``, without the leading target delimiter) before the argmax;
* ``*_stderr`` is lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n).

The prompt layouts, choice lists and gold indices follow lm-eval's task YAMLs (piqa, hellaswag,
winogrande, arc_easy, arc_challenge, openbookqa, super_glue/boolq, siqa), and the tokenization
follows its ``HFLM`` for decoder-only models: trailing whitespace of the context moves to the
start of the continuation, ``context + continuation`` is encoded in one go with the tokenizer's
default special tokens (so a BOS-adding tokenizer such as zoo's byte tokenizer prepends BOS), and
the continuation tokens are whatever follows the separately encoded context. Reproducing those
definitions here lets us score checkpoints without lm-eval installed and still quote numbers that
are comparable with published lm-eval results; ``tests/eval/test_commonsense.py`` checks parity
against lm-eval itself.

Data come from local jsonl files in each dataset's own Hugging Face field layout (one record per
line); nothing is downloaded.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from zoo.data import iter_jsonl

# lm-eval's fallback context length when neither config nor tokenizer names one.
DEFAULT_MAX_LENGTH = 2048
# transformers' "no limit" sentinel for tokenizer.model_max_length (int(1e30)).
_TOKENIZER_INFINITY = 1000000000000000019884624838656


@dataclass(frozen=True)
class Example:
    """One multiple-choice question as lm-eval scores it.

    ``requests[i]`` is the ``(context, continuation)`` pair scored for choice ``i``; ``choices[i]``
    is lm-eval's ``doc_to_choice`` string whose character length normalises ``acc_norm``. For
    most tasks the context is shared and the continuation is ``" " + choices[i]``; winogrande
    varies the context per choice instead. ``source`` is ``"file:line"`` for error messages.
    """

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    gold: int
    source: str = ""

    @classmethod
    def from_choices(
        cls, context: str, choices: Sequence[str], gold: int, source: str = "", delimiter: str = " "
    ) -> Example:
        """The common layout: one context, continuation = delimiter + choice."""
        return cls(
            requests=tuple((context, f"{delimiter}{c}") for c in choices),
            choices=tuple(choices),
            gold=gold,
            source=source,
        )


class _Record:
    """A parsed jsonl line whose accessors raise errors naming file, line and field."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where

    def error(self, field: str, problem: str) -> ValueError:
        return ValueError(f"{self.where}: field {field!r} {problem}")

    def get(self, field: str) -> Any:
        """Value at a dotted path such as ``choices.text``; missing -> ValueError."""
        value: Any = self.data
        for i, part in enumerate(field.split(".")):
            if not isinstance(value, dict) or part not in value:
                missing = ".".join(field.split(".")[: i + 1])
                raise ValueError(f"{self.where}: missing field {missing!r}")
            value = value[part]
        return value

    def text(self, field: str) -> str:
        value = self.get(field)
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {type(value).__name__}")
        return value

    def texts(self, field: str) -> list[str]:
        value = self.get(field)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(field, "must be a list of strings")
        if len(value) < 2:
            raise self.error(field, f"must hold at least 2 choices, got {len(value)}")
        return value

    def integer(self, field: str) -> int:
        """An integer label; dataset dumps store some as digit strings ("3"), lm-eval too."""
        value = self.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.error(field, f"must be an integer, got {value!r}")
        if isinstance(value, str):
            if not value.strip().lstrip("-").isdigit():
                raise self.error(field, f"must be an integer, got {value!r}")
            value = int(value)
        return value

    def gold(self, field: str, value: int, n_choices: int) -> int:
        if not 0 <= value < n_choices:
            raise self.error(field, f"gives answer index {value}, not in [0, {n_choices})")
        return value


# ---- per-task readers: lm-eval's doc_to_text / doc_to_choice / doc_to_target, for one record


def _piqa(r: _Record) -> Example:
    # piqa.yaml: "Question: {{goal}}\nAnswer:", choices [sol1, sol2], target label.
    choices = [r.text("sol1"), r.text("sol2")]
    gold = r.gold("label", r.integer("label"), len(choices))
    return Example.from_choices(f"Question: {r.text('goal')}\nAnswer:", choices, gold, r.where)


def _hellaswag_preprocess(text: str) -> str:
    # lm_eval/tasks/hellaswag/utils.py::preprocess, verbatim.
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag(r: _Record) -> Example:
    # utils.process_docs; note str.capitalize() also lower-cases the rest of ctx_b, as lm-eval.
    ctx = r.text("ctx_a") + " " + r.text("ctx_b").capitalize()
    query = _hellaswag_preprocess(r.text("activity_label") + ": " + ctx)
    choices = [_hellaswag_preprocess(e) for e in r.texts("endings")]
    gold = r.gold("label", r.integer("label"), len(choices))
    return Example.from_choices(query, choices, gold, r.where)


def _winogrande(r: _Record) -> Example:
    # preprocess_winogrande.py "partial evaluation": the context is the sentence up to the blank
    # with the option filled in, the continuation (shared) is the rest after the blank. lm-eval's
    # doc_to_choice returns the contexts, so acc_norm (not reported by lm-eval) divides by them.
    sentence = r.text("sentence")
    if "_" not in sentence:
        raise r.error("sentence", "has no '_' blank")
    idx = sentence.index("_")
    contexts = [sentence[:idx] + r.text("option1"), sentence[:idx] + r.text("option2")]
    continuation = " " + sentence[idx + 1 :].strip()
    answer = r.get("answer")
    if str(answer) not in ("1", "2"):
        raise r.error("answer", f"must be '1' or '2', got {answer!r}")
    return Example(
        requests=tuple((c, continuation) for c in contexts),
        choices=tuple(contexts),
        gold=int(answer) - 1,
        source=r.where,
    )


def _labelled_choices(r: _Record, key_field: str) -> tuple[list[str], int]:
    texts = r.texts("choices.text")
    labels = r.get("choices.label")
    if not isinstance(labels, list) or len(labels) != len(texts):
        raise r.error("choices.label", f"must be a list as long as choices.text ({len(texts)})")
    # openbookqa's YAML strips the key (answerKey.lstrip()); ARC's keys never need it.
    key = r.text(key_field).lstrip()
    if key not in labels:
        raise r.error(key_field, f"{key!r} is not one of choices.label {labels}")
    return texts, labels.index(key)


def _arc(r: _Record) -> Example:
    # arc_easy.yaml (arc_challenge includes it): "Question: {{question}}\nAnswer:".
    choices, gold = _labelled_choices(r, "answerKey")
    return Example.from_choices(f"Question: {r.text('question')}\nAnswer:", choices, gold, r.where)


def _openbookqa(r: _Record) -> Example:
    # openbookqa.yaml: doc_to_text is the bare question_stem.
    choices, gold = _labelled_choices(r, "answerKey")
    return Example.from_choices(r.text("question_stem"), choices, gold, r.where)


def _boolq(r: _Record) -> Example:
    # super_glue/boolq/default.yaml: label 0 = False, 1 = True.
    context = f"{r.text('passage')}\nQuestion: {r.text('question')}?\nAnswer:"
    gold = r.gold("label", r.integer("label"), 2)
    return Example.from_choices(context, ["no", "yes"], gold, r.where)


def _siqa(r: _Record) -> Example:
    # siqa.yaml (task social_iqa): "Q: {{context}} {{question}}\nA:", label 1..3.
    choices = [r.text("answerA"), r.text("answerB"), r.text("answerC")]
    gold = r.gold("label", r.integer("label") - 1, len(choices))
    return Example.from_choices(
        f"Q: {r.text('context')} {r.text('question')}\nA:", choices, gold, r.where
    )


@dataclass(frozen=True)
class TaskSpec:
    """A supported task: how one jsonl record becomes an `Example`, and what lm-eval reports.

    ``lm_eval_task`` is the stock lm-eval task whose definitions ``read`` reproduces; ``metrics``
    are the ones its YAML lists (we compute acc_norm for every task, lm-eval reports it only
    where listed).
    """

    name: str
    lm_eval_task: str
    fields: tuple[str, ...]
    read: Callable[[_Record], Example]
    metrics: tuple[str, ...] = ("acc", "acc_norm")


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("piqa", "piqa", ("goal", "sol1", "sol2", "label"), _piqa),
        TaskSpec(
            "hellaswag",
            "hellaswag",
            ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
            _hellaswag,
        ),
        TaskSpec(
            "winogrande",
            "winogrande",
            ("sentence", "option1", "option2", "answer"),
            _winogrande,
            metrics=("acc",),
        ),
        TaskSpec("arc_easy", "arc_easy", ("question", "choices", "answerKey"), _arc),
        TaskSpec("arc_challenge", "arc_challenge", ("question", "choices", "answerKey"), _arc),
        TaskSpec(
            "openbookqa", "openbookqa", ("question_stem", "choices", "answerKey"), _openbookqa
        ),
        TaskSpec("boolq", "boolq", ("passage", "question", "label"), _boolq, metrics=("acc",)),
        TaskSpec(
            "siqa",
            "social_iqa",
            ("context", "question", "answerA", "answerB", "answerC", "label"),
            _siqa,
            metrics=("acc",),
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    """The `TaskSpec` for ``name``; an unknown name raises ValueError listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def load_task(name: str, path: str | os.PathLike[str]) -> list[Example]:
    """Read ``path`` (jsonl, one record per line in the dataset's own layout) as task ``name``.

    Blank lines are skipped. Invalid JSON, a line that is not an object, a missing or malformed
    field, or a file with no records raise ValueError naming ``file:line`` and the field; a
    missing file raises FileNotFoundError.
    """
    spec = get_task(name)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} data file {path!r} does not exist")
    examples = []
    for where, data in iter_jsonl(path):
        record = _Record(data, where)
        for field in spec.fields:
            record.get(field)  # report the first missing field before any parsing
        examples.append(spec.read(record))
    if not examples:
        raise ValueError(f"{path}: no {name} examples (the file is empty)")
    return examples


# ---- scoring


def resolve_max_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """The longest input lm-eval's HFLM would feed ``model`` (its ``resolve_max_length``)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != _TOKENIZER_INFINITY:
        return int(limit)
    return DEFAULT_MAX_LENGTH


def prefix_token_id(tokenizer: Any) -> int:
    """Token that conditions the first scored token: BOS, else EOS (HFLM.prefix_token_id)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
    token = token if token is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a bos nor an eos token to condition on")
    return int(token)


def encode(tokenizer: Any, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """HFLM.tok_encode: the tokenizer's default special tokens unless the text starts with BOS."""
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    if add_special_tokens is None and text.startswith(tokenizer.decode(prefix_token_id(tokenizer))):
        kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids exactly as lm-eval's TemplateLM.loglikelihood splits them.

    An empty context becomes the prefix token (BOS/EOS), with the continuation encoded without
    special tokens.
    """
    if context == "":
        cont = encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    context_enc = encode(tokenizer, context)
    return context_enc, whole[len(context_enc) :]


def model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def loglikelihoods(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> list[float]:
    """Summed log-probability of each continuation given its context (lm-eval's loglikelihood).

    Requests are sorted longest first and batched with right padding, so no attention mask or
    position shift is needed for a causal model and padding never reaches a scored position;
    inputs longer than ``max_length + 1`` tokens lose tokens from the left, as in HFLM. Works for
    any causal LM returning ``.logits``; the model is put in eval mode for the call.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = max_length or resolve_max_length(model, tokenizer)
    encoded = []
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"request {i}: continuation {continuation!r} encodes to no tokens")
        if len(cont) > max_length:
            raise ValueError(
                f"request {i}: continuation of {len(cont)} tokens exceeds max_length {max_length}"
            )
        # The last token is only ever a target, never an input.
        encoded.append(((ctx + cont)[-(max_length + 1) :][:-1], cont))
    # Longest first (lm-eval's order): padding per batch stays small.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    results = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            tqdm(total=len(order), desc="loglikelihood", disable=not progress) as bar,
        ):
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                width = max(len(encoded[i][0]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                for row, i in enumerate(batch):
                    inp = encoded[i][0]
                    ids[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
                logits = model(input_ids=ids.to(device)).logits
                for row, i in enumerate(batch):
                    inp, cont = encoded[i]
                    # Position t predicts token t+1: the continuation is predicted by the last
                    # len(cont) input positions.
                    scored = logits[row, len(inp) - len(cont) : len(inp)].float()
                    logprobs = F.log_softmax(scored, dim=-1)
                    target = torch.tensor(cont, device=logprobs.device).unsqueeze(-1)
                    results[i] = float(logprobs.gather(-1, target).sum())
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return results


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's ``mean_stderr``: sample std (n - 1) / sqrt(n); NaN below two values."""
    n = len(values)
    if n < 2:
        return math.nan
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def multiple_choice_metrics(
    examples: Sequence[Example], lls: Sequence[Sequence[float]]
) -> dict[str, float]:
    """acc / acc_norm and their stderrs from per-choice log-likelihoods (lm-eval process_results).

    ``lls[k][i]`` is the log-likelihood of choice ``i`` of example ``k``. Ties go to the first
    choice (numpy argmax), as in lm-eval.
    """
    if len(examples) != len(lls):
        raise ValueError(f"{len(examples)} examples but {len(lls)} log-likelihood rows")
    if not examples:
        raise ValueError("no examples to score")
    acc, acc_norm = [], []
    for example, row in zip(examples, lls, strict=True):
        row = np.asarray(row, dtype=np.float64)
        lengths = np.array([float(len(c)) for c in example.choices])
        acc.append(1.0 if int(np.argmax(row)) == example.gold else 0.0)
        acc_norm.append(1.0 if int(np.argmax(row / lengths)) == example.gold else 0.0)
    return {
        "acc": sum(acc) / len(acc),
        "acc_stderr": mean_stderr(acc),
        "acc_norm": sum(acc_norm) / len(acc_norm),
        "acc_norm_stderr": mean_stderr(acc_norm),
    }


def score_multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """Zero-shot acc, acc_stderr, acc_norm, acc_norm_stderr of ``model`` on ``examples``."""
    if not examples:
        raise ValueError("no examples to score")
    requests = [req for ex in examples for req in ex.requests]
    flat = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    rows, start = [], 0
    for ex in examples:
        rows.append(flat[start : start + len(ex.requests)])
        start += len(ex.requests)
    return multiple_choice_metrics(examples, rows)
