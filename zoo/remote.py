"""The `trust_remote_code=True` path: a small shim saved beside every checkpoint.

`config.json` carries an `auto_map` to `modeling_zoo.py` in the checkpoint folder, which only
imports the real classes from the installed hybrid-zoo package (and, for a family registered
outside it, from the module that defines its config). So
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works in a process that never
imported zoo, and the checkpoint never carries a stale copy of the model code.
"""

from __future__ import annotations

from pathlib import Path

from zoo.configuration import ZooConfig

SHIM_MODULE = "modeling_zoo"

_SHIM = '''"""hybrid-zoo remote-code shim: the classes come from the installed hybrid-zoo."""

try:
    from {module} import {config}
    from zoo.modeling import causal_lm_classes
except ImportError as error:  # transformers skips imports inside try blocks when checking them
    raise ImportError(
        "this checkpoint is a hybrid-zoo model: install hybrid-zoo from its source repository "
        "(`pip install -e .` in a checkout; it is not on PyPI yet) and have {module!r} importable"
    ) from error

{stem}Model, {stem}ForCausalLM = causal_lm_classes({config})
__all__ = [{config!r}, "{stem}Model", "{stem}ForCausalLM"]
'''


def auto_map(config: ZooConfig) -> dict[str, str]:
    """The `auto_map` entry of `config`'s family: its classes in the shim."""
    name = type(config).__name__
    stem = name.removesuffix("Config")
    return {
        "AutoConfig": f"{SHIM_MODULE}.{name}",
        "AutoModel": f"{SHIM_MODULE}.{stem}Model",
        "AutoModelForCausalLM": f"{SHIM_MODULE}.{stem}ForCausalLM",
    }


def write_remote_code(config: ZooConfig, save_directory: str | Path) -> None:
    """Write the shim into `save_directory` and point `config.auto_map` at it."""
    cls = type(config)
    if cls is ZooConfig:
        raise ValueError("a bare ZooConfig has no family to load as: use a preset or HybridConfig")
    shim = _SHIM.format(
        module=cls.__module__, config=cls.__name__, stem=cls.__name__.removesuffix("Config")
    )
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{SHIM_MODULE}.py").write_text(shim)
    config.auto_map = auto_map(config)
