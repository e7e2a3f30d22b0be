from __future__ import annotations

import pytest
import torch
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
