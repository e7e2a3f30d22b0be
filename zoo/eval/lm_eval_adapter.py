"""lm-evaluation-harness model class ``zoo``: any zoo checkpoint (or model object) under lm-eval.

lm-eval's ``HFLM`` already evaluates any ``AutoModelForCausalLM``; what a zoo model needs on top
is that ``import zoo`` has registered the zoo families with the Auto classes before HFLM loads a
checkpoint, that a checkpoint without tokenizer files gets zoo's byte tokenizer, and that the
device defaults to CPU when there is no GPU (HFLM defaults to "cuda" unconditionally). So
`ZooLM` is a thin HFLM subclass; loglikelihood, loglikelihood_rolling and generate_until are
HFLM's own, which keeps our numbers identical to ``--model hf`` on any model hf can load.

lm-eval discovers model classes only through modules that have been imported (0.4.x has no
plugin entry points), so ``lm_eval --model zoo`` from the plain console script does not see this
class. Run lm-eval's CLI through this module instead, same arguments::

    python -m zoo.eval.lm_eval_adapter --model zoo --model_args pretrained=runs/ckpt --tasks piqa

or, in Python, import this module before ``lm_eval.simple_evaluate(model="zoo", ...)``.

Importing this module never fails when lm-eval is missing; `ZooLM` is then undefined and
`require_lm_eval` raises an ImportError that says how to install it.
"""

from __future__ import annotations

import os
from typing import Any

INSTALL_HINT = "pip install 'hybrid-zoo[eval]'"

try:  # lm-eval is an optional extra.
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM  # also imports lm_eval.models: registers "hf"
except Exception as e:  # a missing or broken install must not break `import zoo.eval.*`
    _IMPORT_ERROR: Exception | None = e
else:
    _IMPORT_ERROR = None

# Files whose presence means a checkpoint directory carries its own tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def lm_eval_available() -> bool:
    """Whether lm-eval imported cleanly (and `ZooLM` is defined)."""
    return _IMPORT_ERROR is None


def require_lm_eval() -> None:
    """Raise ImportError naming the install command when lm-eval is unavailable."""
    if _IMPORT_ERROR is not None:
        raise ImportError(
            f"lm-eval is required for zoo.eval.lm_eval_adapter but could not be imported "
            f"({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}); install it with: {INSTALL_HINT}"
        ) from _IMPORT_ERROR


def _default_tokenizer(pretrained: Any) -> Any:
    """None (HFLM loads the checkpoint's tokenizer) if ``pretrained`` is a directory with one,
    else zoo's byte tokenizer."""
    from zoo.tokenizer import byte_tokenizer

    if isinstance(pretrained, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(pretrained))
        if not os.path.isdir(path) or any(
            os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES
        ):
            return None  # a hub id or a directory with its own tokenizer
    return byte_tokenizer()


if _IMPORT_ERROR is None:

    @register_model("zoo")
    class ZooLM(HFLM):
        """lm-eval model ``zoo``: HFLM with zoo registered, byte-tokenizer and CPU fallbacks.

        ``pretrained`` is a checkpoint path / hub id or an already built model; ``tokenizer``
        defaults to the checkpoint's own, else zoo's byte tokenizer. Every other keyword is
        HFLM's (batch_size, max_length, dtype, add_bos_token, ...).
        """

        def __init__(
            self,
            pretrained: Any = None,
            tokenizer: Any = None,
            device: str | None = None,
            backend: str = "causal",
            **kwargs: Any,
        ) -> None:
            # This module's import already ran `zoo/__init__`, which registers the zoo families with
            # transformers' Auto classes.
            if pretrained is None:
                raise ValueError("zoo model needs pretrained=<checkpoint dir or model object>")
            if isinstance(pretrained, os.PathLike):
                pretrained = os.fspath(pretrained)
            if tokenizer is None:
                tokenizer = _default_tokenizer(pretrained)
            if isinstance(pretrained, str):  # verified as a zoo checkpoint, errors in one line
                from transformers import AutoTokenizer

                from zoo.modeling import load_pretrained

                if tokenizer is None:
                    tokenizer = AutoTokenizer.from_pretrained(pretrained)
                pretrained = load_pretrained(pretrained)
            if device is None:
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            super().__init__(
                pretrained=pretrained,
                tokenizer=tokenizer,
                device=device,
                backend=backend,
                **kwargs,
            )


def main() -> None:
    """lm-eval's command line with the ``zoo`` model class registered."""
    require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


__all__ = ["INSTALL_HINT", "lm_eval_available", "main", "require_lm_eval"]
if _IMPORT_ERROR is None:
    __all__ += ["ZooLM"]

if __name__ == "__main__":
    main()
