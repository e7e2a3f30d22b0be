"""Runs a user can trust (issue 22): no non-finite checkpoint, fallback past a corrupt one,
SIGTERM stops with a checkpoint and resumes exactly, one run per folder, finished runs are
no-ops, changed settings refused, and no checkpoint file can run code on resume.

Each test drives `python -m zoo.train` (the packaged entry point) from a folder outside the
checkout, as a user's shell or a scheduler would."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from zoo import train_state
from zoo.training import Checkpoints, read_metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "configs" / "tiny-llama.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "zoo.train", RECIPE, *args]


def _train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(*args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600
    )


def _error_line(done: subprocess.CompletedProcess) -> str:
    """The one-line error of a failed run (tqdm's bar may precede it on stderr)."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), done.stderr[-2000:]
    return last


def _steps(run: Path) -> list[str]:
    return [p.name for p in Checkpoints(run, keep_last=100).complete()]


def test_non_finite_weights_are_never_checkpointed_and_a_sane_rerun_resumes(tmp_path):
    # lr=1e3 blows the weights up within a few steps (the loss may still be finite then).
    wild = ("training.steps=30", "logging.checkpoint_every=1", "logging.keep_last=100")
    blown = _train(tmp_path, *wild, "optimizer.lr=1e3", "output_dir=run")
    line = _error_line(blown)
    assert "no checkpoint was written after" in line or "loss is" in line
    saved = _steps(tmp_path / "run")
    assert saved, "the run blew up before its first checkpoint; raise the blow-up step"
    for name in saved:  # every checkpoint written holds finite tensors only
        train_state.verify(tmp_path / "run" / "checkpoints" / name)
    assert saved[-1] in line

    # The newest checkpoint is finite, so a rerun with a sane lr resumes from it (weights grown
    # huge may still diverge: then it fails the same way, again without a bad checkpoint).
    sane = _train(tmp_path, *wild, "optimizer.lr=1e-3", "output_dir=run", "--allow-changes")
    assert f"resuming from run/checkpoints/{saved[-1]}" in sane.stdout, sane.stderr[-3000:]
    assert "optimizer.lr: 1000.0 -> 0.001" in sane.stdout
    assert sane.returncode == 0 or "no checkpoint was written after" in sane.stderr
    for name in _steps(tmp_path / "run"):
        train_state.verify(tmp_path / "run" / "checkpoints" / name)


def test_a_corrupt_latest_checkpoint_is_skipped_by_name(tmp_path):
    args = ("training.steps=4", "logging.checkpoint_every=2", "output_dir=run")
    assert _train(tmp_path, *args).returncode == 0
    run = tmp_path / "run"
    (run / "run.json").unlink()  # pretend it stopped before finishing
    latest = run / "checkpoints" / "step-00000004" / train_state.MODEL_FILE
    data = bytearray(latest.read_bytes())
    data[-8:] = b"garbage!"
    latest.write_bytes(bytes(data))
    resumed = _train(tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping checkpoint" in resumed.stdout and "step-00000004" in resumed.stdout
    assert "resuming from run/checkpoints/step-00000002" in resumed.stdout


def test_a_torn_metrics_line_is_tolerated_and_no_record_is_lost(tmp_path):
    args = ("training.steps=4", "logging.checkpoint_every=2", "logging.log_every=1")
    assert _train(tmp_path, *args, "output_dir=run").returncode == 0
    run = tmp_path / "run"
    before = read_metrics(run / "metrics.jsonl")
    (run / "run.json").unlink()
    with open(run / "metrics.jsonl", "a") as f:  # a kill in the middle of a write
        f.write('{"step": 5, "loss": 1.2')
    resumed = _train(tmp_path, *args, "training.steps=6", "--allow-changes", "output_dir=run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = read_metrics(run / "metrics.jsonl")
    steps = [r["step"] for r in after if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(r in after for r in before if r["step"] <= 4)  # nothing a checkpoint covers lost


def test_sigterm_checkpoints_the_current_step_and_the_rerun_is_exact(tmp_path):
    args = ("training.steps=40", "logging.checkpoint_every=100", "logging.log_every=1")
    reference = _train(tmp_path, *args, "output_dir=reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    process = subprocess.Popen(
        _command(*args, "output_dir=stopped"),
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(read_metrics(metrics)) >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be stopped"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    saved = _steps(tmp_path / "stopped")
    assert len(saved) == 1 and saved[0] != "step-00000040"
    step = int(saved[0].removeprefix("step-"))
    assert f"stopped by SIGTERM after step {step}" in err.strip().splitlines()[-1]

    resumed = _train(tmp_path, *args, "output_dir=stopped")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {step})" in resumed.stdout
    a = load_file(tmp_path / "reference/final/model.safetensors")
    b = load_file(tmp_path / "stopped/final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_run_in_the_same_folder_is_refused_naming_the_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "run"
        run.mkdir()
        import socket

        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "now"}
        (run / ".lock").write_text(json.dumps(lock))
        refused = _train(tmp_path, "training.steps=2", "output_dir=run")
        assert refused.stderr.strip().count("\n") == 0
        assert f"in use by process {holder.pid}" in _error_line(refused)
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its stale lock is taken over.
    taken = _train(tmp_path, "training.steps=2", "output_dir=run")
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert f"took over the lock of process {holder.pid}" in taken.stdout
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_finished_run_is_a_no_op_and_a_changed_lr_is_refused(tmp_path):
    args = ("training.steps=2", "logging.checkpoint_every=1", "output_dir=run")
    assert _train(tmp_path, *args).returncode == 0
    weights = (tmp_path / "run/final/model.safetensors").read_bytes()
    again = _train(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "this run finished (step 2" in again.stdout and "nothing to do" in again.stdout
    assert (tmp_path / "run/final/model.safetensors").read_bytes() == weights

    longer = ("training.steps=4", "logging.checkpoint_every=1", "output_dir=run")
    changed = _train(tmp_path, *longer, "optimizer.lr=0.01")
    line = _error_line(changed)
    assert "optimizer.lr" in line and "--allow-changes" in line
    assert _steps(tmp_path / "run")[-1] == "step-00000002"  # nothing trained


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_no_checkpoint_file_can_run_code_on_resume(tmp_path):
    args = ("training.steps=2", "logging.checkpoint_every=2", "output_dir=run")
    assert _train(tmp_path, *args).returncode == 0
    checkpoint = tmp_path / "run/checkpoints/step-00000002"
    (tmp_path / "run/run.json").unlink()
    originals = {p: p.read_bytes() for p in sorted(checkpoint.iterdir()) if p.is_file()}
    assert len(originals) >= 4, sorted(p.name for p in originals)
    payload = pickle.dumps(_Payload())
    for path, original in originals.items():
        path.write_bytes(payload)
        tampered = _train(tmp_path, *args, "training.steps=4", "--allow-changes")
        path.write_bytes(original)
        assert not (tmp_path / "PWNED").exists(), path.name
        line = _error_line(tampered)
        assert "no checkpoint in" in line and path.name in line, (path.name, line)


def test_no_pickle_in_the_code():
    sources = [*ROOT.glob("zoo/**/*.py"), *ROOT.glob("recipes/**/*.py")]
    sources += [*ROOT.glob("benchmarks/**/*.py"), *ROOT.glob("experiments/**/*.py")]
    for path in sources:
        text = path.read_text()
        assert "weights_only=False" not in text, path
        for banned in ("import pickle", "import dill", "import cloudpickle", "torch.load("):
            assert banned not in text, (path, banned)


def test_accelerate_launch_runs_the_packaged_entry_point_from_any_folder(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    launch = [str(accelerate), "launch", "--num_processes", "1", "--cpu", "-m", "zoo.train"]
    done = subprocess.run(
        [*launch, RECIPE, "training.steps=2", "output_dir=run"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run/final/model.safetensors").is_file()
    assert "done: loss" in done.stdout


# ---------------------------------------------------------------------------------------------
# The user's own text and tokenizer.


def _python_sources(folder: Path) -> dict[Path, bytes]:
    """A folder of real Python files (the standard library's json package) plus the edges a
    splitter would break: leading indentation, blank lines, CRLF, no final newline."""
    import json as stdlib_json

    folder.mkdir()
    for source in Path(stdlib_json.__file__).parent.glob("*.py"):
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "edges.py").write_bytes(b"    indented = 1\r\n\r\n\r\n\tdef f():\n        pass")
    (folder / "sub").mkdir()
    (folder / "sub" / "nested.py").write_bytes("# ünïcode\n\n\nx = '☃'\n".encode())
    return {p: p.read_bytes() for p in folder.rglob("*.py")}


def test_a_folder_of_python_files_reaches_the_packer_byte_for_byte(tmp_path, monkeypatch):
    from zoo import data
    from zoo.recipe import load_recipe
    from zoo.training import train

    files = _python_sources(tmp_path / "src")
    seen: list[str] = []
    pack = data.pack_tokens

    def spy(documents, tokenizer):
        seen.extend(documents)
        return pack(documents, tokenizer)

    monkeypatch.setattr(data, "pack_tokens", spy)
    recipe = load_recipe(
        RECIPE,
        ["data.source=files", f"data.train_files=[{tmp_path / 'src'}]",
         f"data.cache_dir={tmp_path / 'cache'}", "training.steps=1", "logging.eval_every=null",
         f"output_dir={tmp_path / 'run'}"],
    )  # fmt: skip
    train(recipe, echo=lambda _: None, progress=False)
    assert len(seen) == len(files)  # one document per file, none split
    assert sorted(d.encode() for d in seen) == sorted(files.values())


def test_a_trained_bpe_tokenizer_sets_the_vocabulary_and_the_special_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerFast

    files = _python_sources(tmp_path / "src")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<pad>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    bpe.train([str(p) for p in files], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<pad>", unk_token="<unk>",
    )  # fmt: skip
    tokenizer.save_pretrained(tmp_path / "tok")
    size = len(tokenizer)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 0, 1)

    done = _train(
        tmp_path,
        f"tokenizer={tmp_path / 'tok'}", "data.source=files",
        f"data.train_files=[{tmp_path / 'src'}]", f"data.cache_dir={tmp_path / 'cache'}",
        "training.steps=2", "output_dir=run",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    final = tmp_path / "run" / "final"
    config = AutoConfig.from_pretrained(final)
    generation = GenerationConfig.from_pretrained(final)
    saved = PreTrainedTokenizerFast.from_pretrained(final)
    assert config.vocab_size == size == len(saved)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = {getattr(config, name), getattr(generation, name), getattr(saved, name)}
        assert ids == {getattr(tokenizer, name)}, (name, ids)

    too_small = _train(
        tmp_path, f"tokenizer={tmp_path / 'tok'}", f"model.overrides.vocab_size={size - 1}",
        "output_dir=run2",
    )  # fmt: skip
    line = _error_line(too_small)
    assert "model.overrides.vocab_size" in line and str(size) in line
