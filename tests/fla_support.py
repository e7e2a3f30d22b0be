"""What the tests that run fla's own models need (fla is a dev dependency, its kernels Triton)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def give_transformers_its_model_types_back() -> None:
    """Importing fla.models registers fla's classes with transformers' Auto classes under names
    transformers already has ("mamba", "mamba2", ...), so that AutoModelForCausalLM would build
    fla's Mamba for every later test in this process. Drop those registrations: fla's own types
    ("hgrn2", "gla", ...) stay registered, transformers' own come back."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for model_type in [
        name for name in CONFIG_MAPPING._extra_content if name in CONFIG_MAPPING._mapping
    ]:
        del CONFIG_MAPPING._extra_content[model_type]


@contextmanager
def one_autotune_config() -> Iterator[None]:
    """Without a GPU, fla's kernels run under Triton's interpreter, whose autotuner cannot time
    configs: it tries only the first config of each kernel inside this block."""
    import pytest
    from triton.runtime.autotuner import Autotuner

    prune = Autotuner.prune_configs
    with pytest.MonkeyPatch.context() as patch:
        if not torch.cuda.is_available():
            patch.setattr(Autotuner, "prune_configs", lambda self, kw: prune(self, kw)[:1])
        yield
