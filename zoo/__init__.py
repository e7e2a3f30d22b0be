"""hybrid-zoo: efficient sequence models (TNL, HGRN2, cosFormer2, Mamba, Hyena, LLaMA, hybrids).

`import zoo` registers every family (and SAFFU) with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(path)` loads zoo checkpoints. `zoo.register_mixer` and
`zoo.register_family` extend the zoo from your own module (see `zoo.registry`).

The names below are imported when first used. The `zoo` command itself skips the registration
until a command needs a model, so `zoo --help` starts without torch; everything else that
imports this package registers at once.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.version import __version__

if TYPE_CHECKING:
    from zoo.configuration import (
        CosFormer2Config,
        GatedDeltaNetConfig,
        GLAConfig,
        HGRN2Config,
        HybridConfig,
        HyenaConfig,
        LlamaConfig,
        Mamba2Config,
        MambaConfig,
        TNLConfig,
        ZooConfig,
    )
    from zoo.modeling import (
        CosFormer2ForCausalLM,
        CosFormer2Model,
        GatedDeltaNetForCausalLM,
        GatedDeltaNetModel,
        GLAForCausalLM,
        GLAModel,
        HGRN2ForCausalLM,
        HGRN2Model,
        HybridForCausalLM,
        HybridModel,
        HyenaForCausalLM,
        HyenaModel,
        LlamaForCausalLM,
        LlamaModel,
        Mamba2ForCausalLM,
        Mamba2Model,
        MambaForCausalLM,
        MambaModel,
        TNLForCausalLM,
        TNLModel,
        ZooForCausalLM,
        ZooModel,
        register_family,
    )
    from zoo.registry import Setting, register_channel_mixer, register_mixer
    from zoo.saffu.model import SAFFUConfig, SAFFUForCausalLM

_CONFIGS = (
    "CosFormer2",
    "GatedDeltaNet",
    "GLA",
    "HGRN2",
    "Hybrid",
    "Hyena",
    "Llama",
    "Mamba",
    "Mamba2",
    "TNL",
    "Zoo",
)
# name -> the module it lives in.
_EXPORTS: dict[str, str] = {
    **{f"{stem}Config": "zoo.configuration" for stem in _CONFIGS},
    **{f"{stem}{kind}": "zoo.modeling" for stem in _CONFIGS for kind in ("Model", "ForCausalLM")},
    "register_family": "zoo.modeling",
    "Setting": "zoo.registry",
    "register_mixer": "zoo.registry",
    "register_channel_mixer": "zoo.registry",
    "SAFFUConfig": "zoo.saffu.model",
    "SAFFUForCausalLM": "zoo.saffu.model",
}
__all__ = [
    "CosFormer2Config",
    "CosFormer2ForCausalLM",
    "CosFormer2Model",
    "GLAConfig",
    "GLAForCausalLM",
    "GLAModel",
    "GatedDeltaNetConfig",
    "GatedDeltaNetForCausalLM",
    "GatedDeltaNetModel",
    "HGRN2Config",
    "HGRN2ForCausalLM",
    "HGRN2Model",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridModel",
    "HyenaConfig",
    "HyenaForCausalLM",
    "HyenaModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "Mamba2Config",
    "Mamba2ForCausalLM",
    "Mamba2Model",
    "MambaConfig",
    "MambaForCausalLM",
    "MambaModel",
    "SAFFUConfig",
    "SAFFUForCausalLM",
    "Setting",
    "TNLConfig",
    "TNLForCausalLM",
    "TNLModel",
    "ZooConfig",
    "ZooForCausalLM",
    "ZooModel",
    "__version__",
    "register_channel_mixer",
    "register_family",
    "register_mixer",
    "registry",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in ("registry", "layers", "kernels", "eval", "cache", "flops", "training", "data"):
        return importlib.import_module(f"zoo.{name}")
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if Path(sys.argv[0]).name != "zoo":  # not the `zoo` command: register now (see above)
    importlib.import_module("zoo.modeling")
    importlib.import_module("zoo.saffu.model")
