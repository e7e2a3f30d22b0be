"""The `trust_remote_code=True` path: a small shim saved beside every checkpoint.

`config.json` carries an `auto_map` to `modeling_zoo.py` in the checkpoint folder, which only
imports the real classes from the installed hybrid-zoo package. So
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works in a process that never
imported zoo, and the checkpoint never carries a stale copy of the model code.
"""

from __future__ import annotations

from pathlib import Path

from zoo.configuration import ZooConfig

SHIM_MODULE = "modeling_zoo"

_SHIM = '''"""hybrid-zoo remote-code shim: the classes come from the installed hybrid-zoo."""

try:
    from zoo.configuration import {configs}
    from zoo.modeling import {models}
except ImportError as error:  # transformers skips imports inside try blocks when checking them
    raise ImportError(
        "this checkpoint is a hybrid-zoo model: install the package with `pip install hybrid-zoo`"
    ) from error

__all__ = {names!r}
'''


def _family_classes() -> list[tuple[str, str, str]]:
    from zoo.modeling import FAMILIES

    return [(c.__name__, m.__name__, lm.__name__) for c, m, lm in FAMILIES]


def auto_map(config: ZooConfig) -> dict[str, str]:
    """The `auto_map` entry of `config`'s family."""
    for config_name, model_name, lm_name in _family_classes():
        if config_name == type(config).__name__:
            return {
                "AutoConfig": f"{SHIM_MODULE}.{config_name}",
                "AutoModel": f"{SHIM_MODULE}.{model_name}",
                "AutoModelForCausalLM": f"{SHIM_MODULE}.{lm_name}",
            }
    raise ValueError(f"{type(config).__name__} is not a registered zoo family")


def write_remote_code(config: ZooConfig, save_directory: str | Path) -> None:
    """Write the shim into `save_directory` and point `config.auto_map` at it."""
    families = _family_classes()
    configs = ", ".join(c for c, _, _ in families)
    models = ", ".join(name for _, m, lm in families for name in (m, lm))
    names = sorted(name for family in families for name in family)
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    shim = _SHIM.format(configs=configs, models=models, names=names)
    (directory / f"{SHIM_MODULE}.py").write_text(shim)
    config.auto_map = auto_map(config)
