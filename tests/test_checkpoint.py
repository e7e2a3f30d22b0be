"""A missing, truncated or corrupt checkpoint file gets an error naming the file."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from zoo.checkpoint import CheckpointError, check_checkpoint_dir


@pytest.fixture
def saved(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    return tmp_path


def test_intact_checkpoint_passes(saved):
    check_checkpoint_dir(saved)


def test_truncated_weights_file_is_named(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_weights_truncated_inside_the_header_are_named(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_garbage_weights_file_is_named(saved):
    (saved / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_missing_weights_file_is_named(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weights file is missing"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_missing_shard_of_a_sharded_checkpoint_is_named(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 7))
    assert torch.equal(reloaded(ids).logits, tiny_model(ids).logits)
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=shard.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_corrupt_config_is_named(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(OSError, match=r"config\.json"):
        AutoModelForCausalLM.from_pretrained(saved)
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        check_checkpoint_dir(saved)


def _tied_model():
    from tests.tiny import tiny_config

    torch.manual_seed(0)
    shared = {"num_hidden_layers": 3, "mixer_weight_source": [None, 0, None]}
    config = tiny_config("llama", tie_word_embeddings=True, **shared)
    return AutoModelForCausalLM.from_config(config).eval()


def _stored_keys(folder):
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


def test_a_gathered_state_dict_writes_tied_weights_once(tmp_path):
    """accelerate's get_state_dict of an FSDP model hands save_pretrained fresh copies of every
    tensor, the tied ones included (seen on a GPU: the LM head was saved and the folder refused)."""
    model = _tied_model()
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=gathered)
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    assert "lm_head.weight" in tied and len(tied) == 5  # the head and layer 1's shared q, k, v, o
    assert not _stored_keys(tmp_path) & set(tied)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 7))
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_stored_copy_of_a_tied_weight_loads_and_a_misshapen_one_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tied_model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, weights, metadata={"format": "pt"})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 7))
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lm_head\.weight has shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
