"""Publishing a training run to the Hugging Face Hub, and what it would publish.

`run_files(run_dir)` lists every file a run contributes, by its path in the repo: the model
folder (`final/`: config, safetensors shards and index, tokenizer, generation config, the
remote-code shim, the card) at the top level, the training record under `training/`
(`recipe.yaml`, `metrics.jsonl`, `loss.png`) and eval results under `eval/`. `push_run` renders
the card if it is missing, creates the repo and uploads them in one commit through
`huggingface_hub.HfApi`. Loading needs nothing of ours: `AutoModelForCausalLM.from_pretrained
("org/name")` goes through huggingface_hub's cache and honours `HF_HUB_OFFLINE` like any model.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, get_token

from zoo.card import card_for_run

TRAINING_FILES = ("recipe.yaml", "metrics.jsonl", "loss.png")


class HubError(OSError):
    """The Hub cannot be reached or refuses us (offline, not logged in, no permission)."""


def _model_dir(run_dir: Path) -> Path:
    model_dir = run_dir / "final" if (run_dir / "final" / "config.json").is_file() else run_dir
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.json (nor final/config.json) to publish")
    return model_dir


def run_files(run_dir: str | Path) -> dict[str, Path]:
    """path in the repo -> local file, for everything `push_run` uploads."""
    run_dir = Path(run_dir)
    model_dir = _model_dir(run_dir)
    files = {p.name: p for p in sorted(model_dir.iterdir()) if p.is_file()}
    if model_dir != run_dir:
        for name in TRAINING_FILES:
            if (run_dir / name).is_file():
                files[f"training/{name}"] = run_dir / name
        eval_dir = run_dir / "eval"
        if eval_dir.is_dir():
            for path in sorted(eval_dir.iterdir()):
                if path.is_file():
                    files[f"eval/{path.name}"] = path
    return files


def push_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> CommitInfo:
    """Upload a run (see `run_files`) to `repo_id` in one commit. Offline, without a token,
    or when the Hub cannot be reached or refuses, `HubError` says which (before any upload)."""
    if constants.HF_HUB_OFFLINE:
        raise HubError(
            f"HF_HUB_OFFLINE is set: not uploading {run_dir} to {repo_id} (unset it to publish)"
        )
    token = token or get_token()
    if api is None and token is None:
        raise HubError(
            "not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN, then "
            "push again"
        )
    run_dir = Path(run_dir)
    if not (_model_dir(run_dir) / "README.md").is_file():
        card_for_run(run_dir, repo_id)
    files = run_files(run_dir)
    api = api or HfApi(token=token)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        for name, path in files.items()
    ]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload {run_dir.name} with hybrid-zoo",
            repo_type="model",
        )
    except OSError as error:  # requests' connection and HTTP errors, huggingface_hub's too
        reason = " ".join(str(error).split())[:300]
        raise HubError(f"could not push to {repo_id} on {constants.ENDPOINT}: {reason}") from None
