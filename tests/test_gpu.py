"""CUDA checks of the models (run by `make bench-gpu`; skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny import FAMILIES, tiny_config

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_logits_match_cpu(family):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config(family, hidden_size=256, max_position_embeddings=512)
    ).eval()
    ids = torch.randint(0, 256, (2, 300))
    expected = model(ids).logits
    got = model.cuda()(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bf16_is_close_to_fp32(family):
    torch.manual_seed(0)
    model = (
        AutoModelForCausalLM.from_config(
            tiny_config(family, hidden_size=256, max_position_embeddings=512)
        )
        .cuda()
        .eval()
    )
    ids = torch.randint(0, 256, (2, 300), device="cuda")
    reference = model(ids).logits.float()
    low = model.to(torch.bfloat16)(ids).logits.float()
    assert (low - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_generate_matches_full_forward(family):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).cuda().eval()
    model.generation_config.eos_token_id = None
    prompt = torch.randint(0, 256, (2, 13), device="cuda")
    generated = model.generate(prompt, max_new_tokens=16, do_sample=False)
    full = model(generated, use_cache=False).logits[:, 12:-1].argmax(-1)
    assert torch.equal(full, generated[:, 13:])
