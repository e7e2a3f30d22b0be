"""The README's "add a mixer" example runs as printed: the mixer registers, builds, trains a
step and generates with its cache."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from zoo import registry

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_mixer_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    (example,) = [b for b in blocks if "zoo.register_mixer(" in b]
    assert len(example.strip().splitlines()) <= 36  # a short example, as ruff formats it
    scope: dict = {}
    try:
        exec(compile(example, str(README), "exec"), scope)
        config = scope["config"]
        assert config.mixers.count("ema") == 6 and config.ema_expand == 4
        model = AutoModelForCausalLM.from_config(config)
        ids = torch.randint(3, 200, (2, 12))
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        model.eval().generation_config.eos_token_id = None
        generated = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
        full = model(generated, use_cache=False).logits[:, 4:-1].argmax(-1)
        assert torch.equal(full, generated[:, 5:])
    finally:
        if "ema" in registry.sequence_mixers():
            registry.unregister_mixer("ema")
