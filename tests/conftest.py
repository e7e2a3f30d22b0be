from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU; it must be on
# before a kernel module is imported (zoo imports them lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import AutoModelForCausalLM

import zoo
from tests.tiny import FAMILIES, tiny_config

# `make test` runs two xdist workers on two cores: one thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family) -> zoo.ZooForCausalLM:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    # An untrained model may emit </s>; generation must not stop where the reference goes on.
    model.generation_config.eos_token_id = None
    return model


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: without it they are reported as skipped, never silently dropped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run by `make bench-gpu` on a lent GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
