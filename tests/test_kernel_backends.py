"""Whole models on our Triton kernels equal the same models on the torch forms.

TNL, HGRN2 and cosFormer2 run the linear-attention kernels, Mamba the selective scan. On CPU the
kernels run in the Triton interpreter (the conftest sets TRITON_INTERPRET=1), so the models are
tiny; the tiny configs' chunk size 8 becomes the kernels' 16, and lengths 37 and 13 leave ragged
last chunks (and blocks of the scan).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny import tiny_config

FAMILIES = ("tnl", "hgrn2", "cosformer2", "mamba")


def _model(family: str, backend: str):
    torch.manual_seed(0)
    config = tiny_config(family, kernel_backend=backend)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_equal_torch_backend(family):
    input_ids = torch.randint(3, 200, (2, 37), generator=torch.Generator().manual_seed(1))
    results = {}
    for backend in ("torch", "triton"):
        model = _model(family, backend)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (loss, grads), (loss_t, grads_t) = results["torch"], results["triton"]
    torch.testing.assert_close(loss_t, loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_t.keys()
    for name, grad in grads.items():
        if grad is None:
            assert grads_t[name] is None, name
            continue
        torch.testing.assert_close(grads_t[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_torch_backend_left_padded(family):
    # Prefill through the chunked kernel, decode through the fused step kernel.
    input_ids = torch.randint(3, 200, (2, 13), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    out = {}
    for backend in ("torch", "triton"):
        model = _model(family, backend).eval()
        with torch.no_grad():
            out[backend] = model.generate(
                input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
    assert torch.equal(out["triton"].sequences, out["torch"].sequences)
    for a, b in zip(out["triton"].logits, out["torch"].logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
