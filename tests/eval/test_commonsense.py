"""zoo.eval.commonsense / perplexity / lm_eval_adapter: readers, errors, metrics, lm-eval parity.

The fixtures in tests/eval/fixtures/ are a few records per task in each dataset's own Hugging
Face field layout. The parity tests feed the same files to lm-evaluation-harness through task
YAMLs that ``include`` lm-eval's stock task definitions and only swap the dataset for the local
jsonl, so both sides use lm-eval's real prompt, choice and target definitions.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config

from tests.tiny import FAMILIES, tiny_config
from zoo.eval import lm_eval_adapter
from zoo.eval.commonsense import (
    TASKS,
    Example,
    encode_pair,
    load_task,
    loglikelihoods,
    mean_stderr,
    multiple_choice_metrics,
    score_multiple_choice,
)
from zoo.eval.perplexity import perplexity, read_documents
from zoo.tokenizer import byte_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
# lm-eval's stock YAML for each of our tasks (relative to lm_eval/tasks).
STOCK_YAML = {
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "siqa": "siqa/siqa.yaml",
}


def _model(family: str = "llama", **overrides) -> torch.nn.Module:
    # initializer_range 0.2 (not 0.02): peaked, input-dependent predictions, so argmaxes are
    # decided by the model rather than by near-ties of an almost uniform distribution.
    torch.manual_seed(0)
    config = tiny_config(family, initializer_range=0.2, **overrides)
    return AutoModelForCausalLM.from_config(config).eval()


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---- readers: what lm-eval's YAMLs turn each record into


def test_tasks_cover_the_brief():
    assert set(TASKS) == set(STOCK_YAML)
    assert TASKS["siqa"].lm_eval_task == "social_iqa"
    assert TASKS["winogrande"].metrics == ("acc",)


def test_piqa_reader():
    ex = load_task("piqa", FIXTURES / "piqa.jsonl")
    assert len(ex) == 3
    assert ex[1].requests == (
        ("Question: To soften hard brown sugar,\nAnswer:", " put it in the freezer overnight."),
        (
            "Question: To soften hard brown sugar,\nAnswer:",
            " microwave it briefly with a damp paper towel.",
        ),
    )
    assert ex[1].choices == (
        "put it in the freezer overnight.",
        "microwave it briefly with a damp paper towel.",
    )
    assert ex[1].gold == 1
    assert ex[1].source.endswith("piqa.jsonl:2")


def test_hellaswag_reader_applies_lm_eval_preprocess():
    ex = load_task("hellaswag", FIXTURES / "hellaswag.jsonl")
    # ctx_b.capitalize(); label "3" -> 3.
    assert ex[0].requests[3] == (
        "Roof shingle removal: A man is sitting on a roof. He",
        " starts pulling up roofing on a roof.",
    )
    assert ex[0].gold == 3
    # " [title]" -> ". ", other [..] removed, double spaces collapsed once; capitalize() lowers
    # the rest of ctx_b ("Then Scrub The Grates" -> "Then scrub the grates").
    query = "Home and Garden: How to clean a grill. Heat the grill. Then scrub the grates"
    assert ex[1].requests[0] == (query, "  Use a wire brush while the grates are hot.")
    assert ex[1].choices[0] == " Use a wire brush while the grates are hot."
    assert ex[1].choices[2] == " Paint the lid blue."
    assert ex[1].gold == 0


def test_winogrande_reader_partial_evaluation():
    ex = load_task("winogrande", FIXTURES / "winogrande.jsonl")
    stem = "The ice melted faster than the stone because the "
    assert ex[2].requests == (
        (stem + "ice", " was warmer inside."),
        (stem + "stone", " was warmer inside."),
    )
    assert ex[2].choices == (stem + "ice", stem + "stone")
    assert ex[2].gold == 1


def test_arc_readers():
    easy = load_task("arc_easy", FIXTURES / "arc_easy.jsonl")
    assert easy[0].requests[1] == (
        "Question: Which of these is a source of light?\nAnswer:",
        " the Sun",
    )
    assert [e.gold for e in easy] == [1, 1, 0]  # answerKey "B", "2" (numeric labels), "A"
    assert len(easy[1].choices) == 3
    challenge = load_task("arc_challenge", FIXTURES / "arc_challenge.jsonl")
    assert [len(e.choices) for e in challenge] == [4, 5]
    assert [e.gold for e in challenge] == [0, 1]


def test_openbookqa_reader():
    ex = load_task("openbookqa", FIXTURES / "openbookqa.jsonl")
    assert ex[0].requests[0] == ("The sun is responsible for", " puppies learning new tricks")
    assert ex[0].gold == 3
    # The stem keeps its trailing space (moved into the continuation at tokenization time);
    # answerKey " C" is lstripped as in the YAML.
    assert ex[1].requests[2] == (
        "When food is reduced in the stomach ",
        " nutrients are being deconstructed",
    )
    assert ex[1].gold == 2


def test_boolq_and_siqa_readers():
    boolq = load_task("boolq", FIXTURES / "boolq.jsonl")
    assert boolq[1].requests == (
        (
            "Penguins are a group of aquatic flightless birds.\nQuestion: can penguins fly?\n"
            "Answer:",
            " no",
        ),
        (
            "Penguins are a group of aquatic flightless birds.\nQuestion: can penguins fly?\n"
            "Answer:",
            " yes",
        ),
    )
    assert [e.gold for e in boolq] == [1, 0, 1]
    siqa = load_task("siqa", FIXTURES / "siqa.jsonl")
    assert siqa[1].requests[0] == (
        "Q: Sydney walked past a homeless woman asking for change. "
        "How would you describe Sydney?\nA:",
        " sympathetic",
    )
    assert [e.gold for e in siqa] == [2, 0, 2]  # label "3", "1", "3"


# ---- malformed input


def test_missing_field_names_file_line_and_field(tmp_path):
    good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0})
    path = _write(tmp_path / "piqa.jsonl", [good, json.dumps({"goal": "g", "sol1": "a"})])
    with pytest.raises(ValueError, match=r"piqa\.jsonl:2: missing field 'sol2'"):
        load_task("piqa", path)


def test_missing_nested_field(tmp_path):
    record = {"question": "q", "choices": {"text": ["a", "b"]}, "answerKey": "A"}
    path = _write(tmp_path / "arc.jsonl", ["", json.dumps(record)])  # blank line 1 skipped
    with pytest.raises(ValueError, match=r"arc\.jsonl:2: missing field 'choices\.label'"):
        load_task("arc_easy", path)


@pytest.mark.parametrize(
    ("task", "record", "message"),
    [
        ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 2}, r"'label' gives answer"),
        ("piqa", {"goal": "g", "sol1": 1, "sol2": "b", "label": 0}, r"'sol1' must be a string"),
        ("siqa", {**dict.fromkeys(TASKS["siqa"].fields, "x"), "label": "one"}, r"'label' must"),
        (
            "arc_easy",
            {
                "question": "q",
                "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                "answerKey": "E",
            },
            r"'answerKey' 'E' is not one of",
        ),
        (
            "winogrande",
            {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"},
            r"'sentence' has no '_'",
        ),
    ],
)
def test_bad_values_name_the_field(tmp_path, task, record, message):
    path = _write(tmp_path / "d.jsonl", [json.dumps(record)])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: field " + message):
        load_task(task, path)


def test_invalid_json_and_non_object(tmp_path):
    good = json.dumps({"passage": "p", "question": "q", "label": 1})
    path = _write(tmp_path / "b.jsonl", [good, good, '{"passage": "p",'])
    with pytest.raises(ValueError, match=r"b\.jsonl:3: invalid JSON"):
        load_task("boolq", path)
    path = _write(tmp_path / "c.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: expected a JSON object"):
        load_task("boolq", path)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no boolq examples"):
        load_task("boolq", empty)
    blank = _write(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=r"blank\.jsonl: no boolq examples"):
        load_task("boolq", blank)
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_task("boolq", tmp_path / "nope.jsonl")


def test_unknown_task_lists_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'mmlu'.*arc_challenge.*winogrande"):
        load_task("mmlu", tmp_path / "x.jsonl")


# ---- metrics on hand-made log-likelihoods


def test_acc_and_acc_norm_hand_made():
    examples = [
        # acc picks "a" (-2 > -4); acc_norm picks "bbbb" (-4/4 = -1 > -2/1).
        Example.from_choices("q", ["a", "bbbb"], gold=1),
        # Both pick choice 0; gold 0.
        Example.from_choices("q", ["xx", "yy"], gold=0),
        # Length is in characters, not bytes: "é" is 1 character but 2 UTF-8 bytes. By
        # characters -3/1 < -5/2, so acc_norm picks "ab"; by bytes -3/2 > -5/2 would pick "é".
        Example.from_choices("q", ["é", "ab"], gold=1),
        # A tie goes to the first choice (numpy argmax), which is not gold.
        Example.from_choices("q", ["c", "d"], gold=1),
    ]
    lls = [[-2.0, -4.0], [-1.0, -3.0], [-3.0, -5.0], [-1.0, -1.0]]
    got = multiple_choice_metrics(examples, lls)
    acc, acc_norm = [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]
    assert got["acc"] == pytest.approx(0.25)
    assert got["acc_norm"] == pytest.approx(0.75)
    # mean_stderr: sample std (n - 1) over sqrt(n).
    for values, key in ((acc, "acc_stderr"), (acc_norm, "acc_norm_stderr")):
        mu = sum(values) / 4
        expected = math.sqrt(sum((v - mu) ** 2 for v in values) / 3) / 2
        assert got[key] == pytest.approx(expected)
    assert multiple_choice_metrics(examples[2:3], lls[2:3])["acc_norm"] == 1.0


def test_mean_stderr_matches_lm_eval_definition():
    assert mean_stderr([1.0, 0.0, 1.0]) == pytest.approx(1 / 3)
    assert math.isnan(mean_stderr([1.0]))


# ---- log-likelihoods against a direct, unbatched forward pass


def _direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Independent reference: one forward per request, no padding, lm-eval's split by hand."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer.encode(stripped + continuation)  # BOS + bytes for the byte tokenizer
    n_ctx = len(tokenizer.encode(stripped))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[t - 1, whole[t]]) for t in range(n_ctx, len(whole)))


REQUESTS = [
    ("Question: Which of these is a source of light?\nAnswer:", " the Sun"),
    ("When food is reduced in the stomach ", " nutrients are being deconstructed"),
    ("The trophy doesn't fit because the trophy", " is too large."),
    ("Q: café?\nA:", " oui"),
    ("x", " y"),
]


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=259, n_positions=128)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", [*FAMILIES, "gpt2"])
def test_loglikelihoods_match_direct_forward(family):
    model = _gpt2() if family == "gpt2" else _model(family)
    tok = byte_tokenizer()
    expected = [_direct_loglikelihood(model, tok, c, x) for c, x in REQUESTS]
    # batch_size 3: batches mix lengths, so right padding is exercised.
    got = loglikelihoods(model, tok, REQUESTS, batch_size=3, progress=False)
    assert got == pytest.approx(expected, abs=1e-4)
    tok.padding_side = "right"  # the tokenizer's padding side must not matter
    assert loglikelihoods(model, tok, REQUESTS, batch_size=2, progress=False) == pytest.approx(
        expected, abs=1e-4
    )


def test_encode_pair_moves_trailing_space_and_handles_empty_context():
    tok = byte_tokenizer()
    ctx, cont = encode_pair(tok, "ab ", "c")
    assert ctx == [tok.bos_token_id, ord("a"), ord("b")]
    assert cont == [ord(" "), ord("c")]
    # Empty context: the BOS prefix conditions the continuation, encoded without specials.
    assert encode_pair(tok, "", " hi") == ([tok.bos_token_id], [ord(" "), ord("h"), ord("i")])


def test_left_truncation_to_max_length():
    model = _model()
    tok = byte_tokenizer()
    context, continuation = "abcdefghijklmnop", " qrs"
    whole = tok.encode(context + continuation)
    max_length = 8
    ids = torch.tensor([whole[-(max_length + 1) : -1]])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    cont = whole[-4:]
    expected = sum(float(logprobs[max_length - 4 + i, t]) for i, t in enumerate(cont))
    got = loglikelihoods(model, tok, [(context, continuation)], max_length=max_length)
    assert got[0] == pytest.approx(expected, abs=1e-4)


def test_score_multiple_choice_equals_metrics_of_direct_lls():
    model = _model()
    tok = byte_tokenizer()
    examples = load_task("arc_easy", FIXTURES / "arc_easy.jsonl") + load_task(
        "openbookqa", FIXTURES / "openbookqa.jsonl"
    )
    direct = [[_direct_loglikelihood(model, tok, c, x) for c, x in ex.requests] for ex in examples]
    got = score_multiple_choice(model, tok, examples, batch_size=4, progress=False)
    assert got == pytest.approx(multiple_choice_metrics(examples, direct))
    assert set(got) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}


# ---- perplexity


DOCS = ["The quick brown fox jumps over the lazy dog.\n", "Zoo models: TNL, Mamba — café. " * 4]


def _token_logprobs(model, tokenizer, doc: str) -> list[float]:
    ids = [tokenizer.bos_token_id, *tokenizer.encode(doc, add_special_tokens=False)]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = F.log_softmax(logits, dim=-1)
    return [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))]


def test_perplexity_full_context_equals_one_forward():
    model, tok = _model(), byte_tokenizer()
    got = perplexity(model, tok, DOCS, context=512, stride=256, progress=False)
    ll = sum(sum(_token_logprobs(model, tok, d)) for d in DOCS)
    n_bytes = sum(len(d.encode()) for d in DOCS)
    words = 10 + len(DOCS[1].split(" "))  # lm-eval's re.split(r"\s+"): trailing "" counts
    assert got["loglikelihood"] == pytest.approx(ll, abs=1e-3)
    assert got["words"] == words and got["bytes"] == n_bytes and got["tokens"] == n_bytes
    assert got["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-5)
    assert got["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-5)
    assert got["token_perplexity"] == pytest.approx(got["byte_perplexity"])  # byte tokenizer
    assert got["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)


@pytest.mark.parametrize(("context", "stride"), [(16, 16), (16, 5), (7, 3), (12, 1)])
def test_perplexity_strided_windows_score_each_token_once(context, stride):
    """Brute force: token t is scored from the window whose end is the first window end >= t."""
    model, tok = _model(), byte_tokenizer()
    doc = DOCS[1]
    ids = [tok.bos_token_id, *tok.encode(doc, add_special_tokens=False)]
    last = len(ids) - 1
    ends = [min(context, last)]
    while ends[-1] < last:
        ends.append(min(ends[-1] + stride, last))
    expected = 0.0
    for t in range(1, last + 1):
        end = next(e for e in ends if e >= t)
        start = max(0, end - context)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[start:end]])).logits[0, t - 1 - start]
        expected += float(F.log_softmax(logits.float(), dim=-1)[ids[t]])
        if end > context:  # every later-window token has >= context - stride + 1 of history
            assert t - start >= context - stride + 1
    got = perplexity(model, tok, [doc], context=context, stride=stride, progress=False)
    assert got["loglikelihood"] == pytest.approx(expected, abs=1e-3)
    assert got["tokens"] == last


def test_perplexity_reads_files_and_reports_bad_input(tmp_path):
    model, tok = _model(), byte_tokenizer()
    jsonl = _write(tmp_path / "w.jsonl", [json.dumps({"text": d}) for d in DOCS])
    txt = tmp_path / "w.txt"
    txt.write_text(DOCS[0], encoding="utf-8")
    assert read_documents(jsonl) == DOCS and read_documents(txt) == [DOCS[0]]
    by_file = perplexity(model, tok, jsonl, context=64, progress=False)
    assert by_file == pytest.approx(perplexity(model, tok, DOCS, context=64, progress=False))
    bad = _write(tmp_path / "bad.jsonl", [json.dumps({"text": "a"}), json.dumps({"txt": "b"})])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing field 'text'"):
        read_documents(bad)
    bad = _write(tmp_path / "bad2.jsonl", [json.dumps({"text": ""})])
    with pytest.raises(ValueError, match=r"bad2\.jsonl:1: field 'text' is empty"):
        read_documents(bad)
    bad = _write(tmp_path / "bad3.jsonl", ["{"])
    with pytest.raises(ValueError, match=r"bad3\.jsonl:1: invalid JSON"):
        read_documents(bad)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt: the file is empty"):
        read_documents(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        perplexity(model, tok, tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tok, DOCS, context=8, stride=9)


# ---- lm-eval adapter without lm-eval


def test_adapter_imports_without_lm_eval(monkeypatch):
    import importlib.util

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    spec = importlib.util.spec_from_file_location("_adapter_no_lm_eval", lm_eval_adapter.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.lm_eval_available()
    assert not hasattr(module, "ZooLM")
    with pytest.raises(ImportError, match=r"pip install 'hybrid-zoo\[eval\]'"):
        module.require_lm_eval()


# ---- parity with lm-evaluation-harness itself


def _task_yamls(directory: Path, cache_dir: Path) -> dict[str, str]:
    """Custom lm-eval tasks: the stock task definitions with our local jsonl as the data."""
    import lm_eval.tasks

    stock = Path(lm_eval.tasks.__file__).parent
    names = {}
    for name, rel in STOCK_YAML.items():
        names[name] = f"zoo_test_{name}"
        (directory / f"zoo_test_{name}.yaml").write_text(
            f"include: {stock / rel}\n"
            f"task: zoo_test_{name}\n"
            "tag: []\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    validation: {json.dumps(str(FIXTURES / (name + '.jsonl')))}\n"
            f"  cache_dir: {json.dumps(str(cache_dir))}\n"
            "training_split: null\n"
            "validation_split: validation\n"
            "test_split: null\n"
            "fewshot_split: null\n"
            # acc_norm for every task (lm-eval lists it only for some): compare it everywhere.
            "metric_list:\n"
            "  - metric: acc\n"
            "  - metric: acc_norm\n"
        )
    return names


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
    pytest.importorskip("lm_eval")
    if not lm_eval_adapter.lm_eval_available():  # installed but fails to import
        pytest.skip(f"lm-eval does not import: {lm_eval_adapter._IMPORT_ERROR!r}")
    from lm_eval.tasks import TaskManager

    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    names = _task_yamls(directory, tmp_path_factory.mktemp("hf_datasets_cache"))
    try:  # include_defaults=False: don't index lm-eval's ~10k stock YAMLs (several seconds).
        manager = TaskManager(include_path=str(directory), include_defaults=False)
    except TypeError:  # lm-eval before include_defaults existed
        manager = TaskManager(include_path=str(directory))
    return names, manager


def _run_lm_eval(lm, names, task_manager):
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(names.values()),
        task_manager=task_manager,
        num_fewshot=0,
        log_samples=True,
    )
    samples = {
        task: sorted(results["samples"][lm_name], key=lambda s: s["doc_id"])
        for task, lm_name in names.items()
    }
    return results["results"], samples


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_lm_eval(family, lm_eval_tasks):
    """Same model, same data: lm-eval's prompts, log-likelihoods and metrics are ours."""
    from lm_eval.models.huggingface import HFLM

    names, task_manager = lm_eval_tasks
    model, tok = _model(family), byte_tokenizer()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    results, samples = _run_lm_eval(lm, names, task_manager)
    for task, lm_name in names.items():
        examples = load_task(task, FIXTURES / f"{task}.jsonl")
        docs = samples[task]
        assert len(docs) == len(examples)
        # 1. Identical (context, continuation) requests: prompts, choices, whitespace.
        for ex, doc in zip(examples, docs, strict=True):
            assert [tuple(a) for a in doc["arguments"]] == list(ex.requests), (task, ex.source)
        # 2. Identical per-example acc / acc_norm from lm-eval's own log-likelihoods: same gold
        #    index and same normalisation.
        theirs = [[float(r[0]) for r in doc["filtered_resps"]] for doc in docs]
        for ex, doc, lls in zip(examples, docs, theirs, strict=True):
            mine = multiple_choice_metrics([ex], [lls])
            assert (mine["acc"], mine["acc_norm"]) == (doc["acc"], doc["acc_norm"]), ex.source
        # 3. Our own log-likelihoods (different batching) agree with lm-eval's.
        requests = [r for ex in examples for r in ex.requests]
        ours = loglikelihoods(model, tok, requests, batch_size=3, progress=False)
        assert ours == pytest.approx([x for row in theirs for x in row], abs=2e-4), task
        # 4. The end-to-end numbers, stderrs included.
        got = score_multiple_choice(model, tok, examples, batch_size=3, progress=False)
        want = results[lm_name]
        for key in ("acc", "acc_norm"):
            assert got[key] == pytest.approx(want[f"{key},none"], abs=1e-12), (task, key)
            assert got[f"{key}_stderr"] == pytest.approx(want[f"{key}_stderr,none"]), (task, key)


def test_zoo_adapter_registered_and_loads_checkpoints(lm_eval_tasks, tmp_path):
    """``model="zoo"`` from a saved checkpoint gives lm-eval's HFLM numbers on the model object."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    assert get_model("zoo") is lm_eval_adapter.ZooLM
    names, task_manager = lm_eval_tasks
    names = {k: names[k] for k in ("piqa", "winogrande")}
    model, tok = _model(), byte_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    import lm_eval

    by_name = lm_eval.simple_evaluate(
        model="zoo",
        model_args={"pretrained": str(tmp_path)},
        tasks=list(names.values()),
        task_manager=task_manager,
        num_fewshot=0,
        batch_size=2,
    )["results"]
    reference, _ = _run_lm_eval(
        HFLM(pretrained=model, tokenizer=tok, device="cpu"), names, task_manager
    )
    for lm_name in names.values():
        for key in ("acc,none", "acc_norm,none"):
            assert by_name[lm_name][key] == reference[lm_name][key]

    # The other two request types work on a model object with the default byte tokenizer.
    lm = lm_eval_adapter.ZooLM(pretrained=model, batch_size=2, max_length=16)
    assert lm.device.type == "cpu"
    rolling = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (DOCS[1],), 0)], disable_tqdm=True
    )
    # lm-eval's rolling windows (its default add_bos_token also scores the tokenizer's BOS)
    # are our perplexity windows with stride == context when BOS is not added.
    lm_no_bos = lm_eval_adapter.ZooLM(pretrained=model, max_length=16, add_bos_token=False)
    rolling_no_bos = lm_no_bos.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (DOCS[1],), 0)], disable_tqdm=True
    )
    ppl = perplexity(model, tok, [DOCS[1]], context=16, stride=16, progress=False)
    assert rolling_no_bos[0] == pytest.approx(ppl["loglikelihood"], abs=1e-3)
    assert math.isfinite(rolling[0])
    generated = lm.generate_until(
        [
            Instance(
                "generate_until",
                {},
                ("Question: 2+2?\nAnswer:", {"until": ["\n"], "max_gen_toks": 5}),
                0,
            )
        ],
        disable_tqdm=True,
    )
    assert isinstance(generated[0], str) and "\n" not in generated[0]
