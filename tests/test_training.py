"""The training loop: every tiny recipe trains, DDP on CPU, exact resume, checkpoints, errors."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from zoo import registry
from zoo.data import CorpusConfig, pack_tokens, synthetic_documents, unigram_entropy
from zoo.recipe import RecipeError, load_recipe
from zoo.tokenizer import byte_tokenizer
from zoo.training import Checkpoints, NonFiniteLossError, read_metrics, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
TINY = sorted(p.name for p in CONFIGS.glob("tiny-*.yaml"))


def _recipe(name: str, tmp_path: Path, *overrides: str):
    return load_recipe(CONFIGS / name, [f"output_dir={tmp_path / 'run'}", *overrides])


def _records(run: Path) -> list[dict]:
    return read_metrics(run / "metrics.jsonl")


def test_every_family_has_a_tiny_recipe():
    families = {load_recipe(CONFIGS / name).model.preset for name in TINY}
    assert families == set(registry.families())
    assert "tiny-striped-moe.yaml" in TINY


@pytest.mark.parametrize("name", TINY)
def test_tiny_recipe_trains(name, tmp_path):
    recipe = _recipe(name, tmp_path, "logging.checkpoint_every=null")
    result = train(recipe, echo=lambda _: None)
    records = [r for r in _records(result.output_dir) if "loss" in r]
    first, last = records[0]["loss"], records[-1]["loss"]
    # From ~ln(259) = 5.6 nats at init: every family is well down after 60 steps, and below the
    # unigram entropy of its training text (~3.2 nats), the loss of any context-free predictor.
    assert last < 0.8 * first and last < 3.6, (first, last)
    synthetic = recipe.data.synthetic
    corpus = CorpusConfig(seed=synthetic.seed, train_docs=synthetic.train_docs)
    entropy = unigram_entropy(pack_tokens(synthetic_documents("train", corpus), byte_tokenizer()))
    assert result.eval_loss is not None and result.eval_loss < entropy, (result.eval_loss, entropy)
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert model.config.model_type == f"zoo_{recipe.model.preset}"
    assert (result.output_dir / "loss.png").stat().st_size > 1000
    if "moe" in name:
        loads = records[-1]["expert_load_max_over_mean"]
        assert len(loads) == 3 and all(1.0 <= x <= 2.0 for x in loads)
        assert records[-1]["aux_loss"] > 0


def _run_script(tmp_path: Path, *args: str, launcher: tuple[str, ...] = (), env=None):
    command = [*launcher, str(ROOT / "recipes" / "train.py"), *args]
    if not launcher:
        command = [sys.executable, *command]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=full_env
    )


def test_ddp_on_cpu_with_accelerate_launch(tmp_path):
    """Two processes (gloo) see disjoint halves of each step's data; the step is the same as one
    process's, so the losses match a single-process run of the same recipe."""
    accelerate = Path(sys.executable).with_name("accelerate")
    args = (str(CONFIGS / "tiny-tnl.yaml"), "logging.checkpoint_every=null")
    ddp = _run_script(
        tmp_path,
        *args,
        "output_dir=ddp",
        launcher=(
            str(accelerate),
            "launch",
            "--config_file",
            str(ROOT / "recipes/accelerate/cpu_ddp.yaml"),
        ),
        env={"ACCELERATE_USE_CPU": "1"},
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "on each of 2 process(es)" in ddp.stdout
    single = _run_script(tmp_path, *args, "output_dir=single")
    assert single.returncode == 0, single.stderr[-3000:]
    losses = {
        run: [r["loss"] for r in _records(tmp_path / run) if "loss" in r]
        for run in ("ddp", "single")
    }
    assert losses["ddp"][-1] < 0.8 * losses["ddp"][0]
    assert losses["ddp"] == pytest.approx(losses["single"], rel=1e-4)


def test_killed_run_resumes_bit_identically(tmp_path):
    """SIGKILL mid-run, resume: the same loss and weights at the last step as an uninterrupted
    run (fp32, CPU)."""
    args = (
        str(CONFIGS / "tiny-llama.yaml"),
        "training.steps=16",
        "logging.checkpoint_every=2",
        "logging.log_every=1",
        "logging.keep_last=3",
    )
    reference = _run_script(tmp_path, *args, "output_dir=reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    command = [sys.executable, str(ROOT / "recipes/train.py"), *args, "output_dir=killed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = Checkpoints(tmp_path / "killed", keep_last=3)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        latest = checkpoints.latest()
        if latest is not None and latest.name >= "step-00000006":
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = checkpoints.latest()
    assert killed_at is not None and killed_at.name < "step-00000016"

    resumed = _run_script(tmp_path, *args, "output_dir=killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {killed_at.relative_to(tmp_path)}" in resumed.stdout
    a = load_file(tmp_path / "reference/final/model.safetensors")
    b = load_file(tmp_path / "killed/final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref, res = _records(tmp_path / "reference"), _records(tmp_path / "killed")
    exact = ("loss", "grad_norm", "eval_loss", "lr")

    def last(records):
        return {k: r[k] for r in records if r["step"] == 16 for k in exact if k in r}

    assert last(res) == last(ref) and len(last(ref)) == 4
    # The resumed log has each step once, in order.
    steps = [r["step"] for r in res if "loss" in r]
    assert steps == sorted(set(steps)) == list(range(1, 17))


def test_a_crash_while_checkpointing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    recipe = _recipe("tiny-llama.yaml", tmp_path, "training.steps=4", "logging.checkpoint_every=2")
    from zoo import train_state

    original = train_state.save

    def crash_on_second(folder, *args, **kwargs):
        if folder.name.endswith("step-00000004"):
            Path(folder, "model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt("killed while writing")
        return original(folder, *args, **kwargs)

    monkeypatch.setattr(train_state, "save", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, echo=lambda _: None)
    checkpoints = Checkpoints(recipe.output_dir, keep_last=2)
    assert [p.name for p in checkpoints.complete()] == ["step-00000002"]
    monkeypatch.setattr(train_state, "save", original)
    messages = []
    train(recipe, echo=messages.append)
    assert any("resuming from" in m and "step-00000002" in m for m in messages)
    assert [p.name for p in checkpoints.complete()] == ["step-00000002", "step-00000004"]
    assert not list(checkpoints.root.glob(".tmp-*"))


def test_resume_refuses_a_different_model(tmp_path):
    recipe = _recipe("tiny-llama.yaml", tmp_path, "training.steps=2", "logging.checkpoint_every=2")
    train(recipe, echo=lambda _: None)
    wider = _recipe(
        "tiny-llama.yaml",
        tmp_path,
        "training.steps=4",
        "logging.checkpoint_every=2",
        "model.overrides.hidden_size=96",
    )
    with pytest.raises(RecipeError, match=r"model config differs in \['hidden_size'"):
        train(wider, echo=lambda _: None)
    other_batch = _recipe("tiny-llama.yaml", tmp_path, "training.steps=4", "training.seq_len=32")
    with pytest.raises(RecipeError, match=r"training\.seq_len: 64 -> 32"):
        train(other_batch, echo=lambda _: None)


def test_non_finite_loss_names_its_step(tmp_path):
    recipe = _recipe(
        "tiny-llama.yaml", tmp_path, "training.steps=5", "logging.checkpoint_every=null"
    )
    model = AutoModelForCausalLM.from_config(recipe.build_config())
    calls = {"n": 0}
    forward = model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 4 * 2:  # 4 micro-batches per step: step 3 goes NaN
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train(recipe, model=model, echo=lambda _: None)


@pytest.mark.gpu
def test_fsdp_launch_config_trains_on_gpus(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    result = _run_script(
        tmp_path,
        str(CONFIGS / "tiny-tnl.yaml"),
        "training.steps=6",
        "logging.checkpoint_every=3",
        "output_dir=fsdp",
        launcher=(
            str(accelerate),
            "launch",
            "--config_file",
            str(ROOT / "recipes/accelerate/fsdp.yaml"),
            "--num_processes",
            str(torch.cuda.device_count()),
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: FSDP was requested" not in result.stdout
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp/final")
    assert math.isfinite(float(next(model.parameters()).sum()))


def test_compile_true_trains_the_same_run(tmp_path, monkeypatch):
    """`training.compile: true` compiles the model in place: the loss curve and the saved weights
    are eager's (the `aot_eager` backend here, so the test is about the wiring; inductor's
    compile time and speed are benchmarks/train_step.py's), and resuming may switch it."""
    compiled_calls = []
    original = torch.nn.Module.compile

    def compile_(module, *args, **kwargs):
        compiled_calls.append(type(module).__name__)
        return original(module, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_)
    common = ("logging.checkpoint_every=null", "training.steps=6")
    eager = train(_recipe("tiny-tnl.yaml", tmp_path / "eager", *common), echo=lambda _: None)
    torch._dynamo.reset()
    compiled = train(
        _recipe("tiny-tnl.yaml", tmp_path / "compiled", *common, "training.compile=true"),
        echo=lambda _: None,
    )
    assert compiled_calls == ["TNLForCausalLM"]
    losses = [
        [r["loss"] for r in _records(run.output_dir) if "loss" in r] for run in (eager, compiled)
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    weights = [load_file(run.final_dir / "model.safetensors") for run in (eager, compiled)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    # Compiling changes how a step is computed, not what: a resumed run may switch it.
    from zoo.training import recipe_changes

    before = {"training": {"compile": False, "seq_len": 64}}
    assert recipe_changes(before, {"training": {"compile": True, "seq_len": 64}}) == []
    assert (
        recipe_changes(
            {"training": {"seq_len": 64}}, {"training": {"compile": True, "seq_len": 64}}
        )
        == []
    )
    assert recipe_changes(before, {"training": {"compile": True, "seq_len": 32}}) == [
        "training.seq_len: 64 -> 32"
    ]


def test_the_loop_trains_a_transformers_model(tmp_path):
    """train() takes any causal LM: transformers' own Llama (benchmarks/train_step.py's
    reference) gets its loss from the loop's windows and learns."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    recipe = _recipe(
        "tiny-llama.yaml", tmp_path, "logging.checkpoint_every=null", "training.steps=20"
    )
    flops = 6 * model.num_parameters()  # zoo.flops counts zoo models only
    result = train(
        recipe, model=model, flops_per_token=flops, save_final=False, echo=lambda _: None
    )
    losses = [r["loss"] for r in _records(result.output_dir) if "loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.9 * losses[0]
