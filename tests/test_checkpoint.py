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
