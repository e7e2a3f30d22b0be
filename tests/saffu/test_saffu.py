"""SAFFU: the explicit solution against counting and backprop, the warm start, the pipeline."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from zoo.cli import app
from zoo.data import CorpusConfig, synthetic_documents
from zoo.saffu.experiment import ExperimentConfig, run_experiment, train_arm
from zoo.saffu.model import (
    SAFFUConfig,
    SAFFUForCausalLM,
    TokenDocuments,
    explicit_softmax_solution,
    solve,
)
from zoo.tokenizer import byte_tokenizer

# A one-hot problem small enough to count by hand: (feature, class) pairs.
PAIRS = [(0, 0), (0, 0), (0, 1), (0, 2), (1, 1), (1, 1), (1, 1), (1, 3), (2, 0), (2, 3)]


def _one_hot_data():
    x = torch.nn.functional.one_hot(torch.tensor([f for f, _ in PAIRS]), 3).float()
    y = torch.tensor([c for _, c in PAIRS])
    return x, y


def test_explicit_solution_is_the_log_conditional_probability_counted_by_hand():
    x, y = _one_hot_data()
    phi = x.T @ torch.nn.functional.one_hot(y, 4).float()  # generalised co-occurrence
    W = explicit_softmax_solution(phi, mass=1, eps=1e-12)
    # Feature 0 saw classes 0, 0, 1, 2; feature 1 saw 1, 1, 1, 3; feature 2 saw 0, 3.
    by_hand = torch.tensor(
        [[2 / 4, 1 / 4, 1 / 4, 0.0], [0.0, 3 / 4, 0.0, 1 / 4], [1 / 2, 0.0, 0.0, 1 / 2]]
    )
    seen = by_hand > 0
    torch.testing.assert_close(W[seen], by_hand[seen].log())
    assert (W[~seen] < -20).all()  # unseen pairs: log(eps / count), far below every seen one
    # It is the optimum: a long backprop run of the same layer does not beat it.
    explicit_loss = torch.nn.functional.cross_entropy(x @ W, y).item()
    torch.manual_seed(0)
    trained = torch.zeros(3, 4, requires_grad=True)
    optimizer = torch.optim.Adam([trained], lr=0.1)
    for _ in range(3000):
        loss = torch.nn.functional.cross_entropy(x @ trained, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rows = ((4, [0.5, 0.25, 0.25]), (4, [0.75, 0.25]), (2, [0.5, 0.5]))  # (count, P(class | f))
    entropy = -sum(n * p * math.log(p) for n, row in rows for p in row) / len(PAIRS)
    assert explicit_loss == pytest.approx(entropy, abs=1e-6)  # the conditional entropy
    assert explicit_loss <= loss.item() + 1e-6


def _corpus(docs: int = 300, seed: int = 0, split: str = "train") -> TokenDocuments:
    spec = CorpusConfig(seed=seed, train_docs=docs, validation_docs=40)
    return TokenDocuments.from_texts(synthetic_documents(split, spec), byte_tokenizer())


def test_with_a_one_token_window_the_solved_model_is_the_bigram_model():
    corpus = _corpus(100)
    model = SAFFUForCausalLM(SAFFUConfig(context_radius=1, eps=1e-9))
    solve(model, corpus)
    counts = torch.zeros(259, 259, dtype=torch.float64)
    for doc in corpus.documents:
        for a, b in itertools.pairwise(doc):
            counts[a, b] += 1
    ids = torch.tensor(corpus.documents[0])[None]
    logits = model(ids).logits[0, :-1].double()  # log-probabilities
    expected = (counts / counts.sum(-1, keepdim=True)).log()[ids[0, :-1], ids[0, 1:]]
    torch.testing.assert_close(
        logits.gather(1, ids[0, 1:, None])[:, 0], expected, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("embedding", ["onehot", "bitcipher"])
def test_warm_start_begins_far_below_random_init(embedding):
    train, validation = _corpus(300), _corpus(300, split="validation")
    config = ExperimentConfig(data_tokens=[10_000], context_radius=[3], steps=1, eval_every=1)
    settings = SAFFUConfig(context_radius=3, embedding=embedding, embedding_bits=10)
    warm = train_arm(config, "warm", settings, train.truncated(10_000), validation)
    cold = train_arm(config, "cold", settings, train.truncated(10_000), validation)
    assert cold["initial_eval_loss"] == pytest.approx(math.log(259), abs=0.05)
    assert warm["initial_eval_loss"] < cold["initial_eval_loss"] - 2.0


def test_pipeline_is_deterministic_by_seed():
    train, validation = _corpus(200).truncated(5_000), _corpus(200, split="validation")
    settings = SAFFUConfig(context_radius=2)
    runs = [
        train_arm(ExperimentConfig(data_tokens=[1], context_radius=[2], steps=6, eval_every=3,
                                   seed=seed), arm, settings, train, validation)
        for seed, arm in ((0, "warm"), (0, "warm"), (0, "cold"), (0, "cold"), (1, "cold"))
    ]  # fmt: skip
    assert runs[0] == runs[1] and runs[2] == runs[3]
    assert runs[4]["curve"] != runs[2]["curve"]


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="the corpus is empty"):
        TokenDocuments.from_texts([], byte_tokenizer())
    with pytest.raises(ValueError, match="the corpus is empty"):
        TokenDocuments(((), ()), 259, "x")
    with pytest.raises(ValueError, match="document 1 has token id 300 outside"):
        TokenDocuments(((1, 2), (300,)), 259, "x")
    short = TokenDocuments(((1, 2, 3), (4, 5)), 259, "x")
    with pytest.raises(ValueError, match="context_radius=4 is longer than any document"):
        solve(SAFFUForCausalLM(SAFFUConfig(context_radius=4)), short)
    # Solved on one vocabulary, trained or evaluated on another.
    model = SAFFUForCausalLM(SAFFUConfig(context_radius=2))
    solve(model, short)
    other = TokenDocuments(((1, 2, 3),), 259, "another-tokenizer")
    with pytest.raises(ValueError, match="another vocabulary"):
        solve(model, other)
    with pytest.raises(ValueError, match="vocab_size=100, the model 259"):
        solve(model, TokenDocuments(((1, 2, 3),), 100, "x"))
    config = ExperimentConfig(data_tokens=[5], context_radius=[2], steps=1)
    with pytest.raises(ValueError, match="another vocabulary"):
        train_arm(config, "warm", SAFFUConfig(context_radius=2), short, other)


def test_saved_model_loads_through_auto_classes_and_generates(tmp_path):
    model = SAFFUForCausalLM(SAFFUConfig(context_radius=3, embedding="bitcipher",
                                         embedding_bits=10))  # fmt: skip
    solve(model, _corpus(50))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is SAFFUForCausalLM
    ids = torch.tensor(_corpus(5).documents[0])[None, :12]
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert torch.equal(loaded.embedding, model.embedding)  # the data-made codes are saved
    loaded.generation_config.eos_token_id = None
    out = loaded.generate(ids, max_new_tokens=4, do_sample=False)
    seq = ids
    for _ in range(4):
        seq = torch.cat([seq, loaded(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_experiment_writes_logs_and_plots_and_resumes(tmp_path):
    config = ExperimentConfig(
        train_docs=200, validation_docs=20, data_tokens=[2_000, 6_000], context_radius=[2],
        embeddings=["onehot", "bits10"], steps=4, eval_every=2, batch_size=4, seq_len=32,
    )  # fmt: skip
    report = run_experiment(config, tmp_path, progress=False)
    text = report.read_text()
    assert "| onehot | 2 | 2,000 |" in text and "| bits10 | 2 | 6,000 |" in text
    for plot in ("loss_vs_data.png", "curves.png"):
        assert (tmp_path / plot).stat().st_size > 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 8  # 2 sizes × 2 embeddings × 2 arms
    lines = (runs[0] / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 0, "eval_loss": json.loads(lines[0])["eval_loss"]}
    assert len(lines) == 5
    stamps = {p: (p / "result.json").stat().st_mtime_ns for p in runs}
    run_experiment(config, tmp_path, progress=False)  # everything finished: nothing reruns
    assert stamps == {p: (p / "result.json").stat().st_mtime_ns for p in runs}


def test_cli_names_a_bad_experiment_key(tmp_path):
    path = tmp_path / "experiment.yaml"
    path.write_text("data_tokens: [100]\ncontext_radius: [2]\nembeddings: [glove]\n")
    result = CliRunner().invoke(app, ["saffu", "run", str(path), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "embeddings" in result.output and "onehot or bits" in result.output
