"""hybrid-zoo: efficient sequence models (TNL, HGRN2, cosFormer2, Mamba, Hyena, LLaMA, hybrids).

`import zoo` registers every family with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(path)` loads zoo checkpoints. `zoo.register_mixer` and
`zoo.register_family` extend the zoo from your own module (see `zoo.registry`).
"""

from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from zoo import registry
from zoo.configuration import (
    CosFormer2Config,
    HGRN2Config,
    HybridConfig,
    HyenaConfig,
    LlamaConfig,
    MambaConfig,
    TNLConfig,
    ZooConfig,
)
from zoo.modeling import (
    CosFormer2ForCausalLM,
    CosFormer2Model,
    HGRN2ForCausalLM,
    HGRN2Model,
    HybridForCausalLM,
    HybridModel,
    HyenaForCausalLM,
    HyenaModel,
    LlamaForCausalLM,
    LlamaModel,
    MambaForCausalLM,
    MambaModel,
    TNLForCausalLM,
    TNLModel,
    ZooForCausalLM,
    ZooModel,
    causal_lm_classes,
)
from zoo.registry import Setting, register_channel_mixer, register_mixer
from zoo.saffu.model import SAFFUConfig, SAFFUForCausalLM
from zoo.version import __version__


def _register_auto(family: registry.Family) -> None:
    config = family.config_class()
    model, lm = causal_lm_classes(config)
    AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModel.register(config, model, exist_ok=True)
    AutoModelForCausalLM.register(config, lm, exist_ok=True)


def register_family(name: str, config: type[ZooConfig], **entry: Any) -> registry.Family:
    """Register a family (`zoo.registry.register_family`), make its model classes and register
    them with transformers' Auto classes, so `AutoModelForCausalLM.from_config` builds it."""
    family = registry.register_family(name, config, **entry)
    _register_auto(family)
    return family


for _family in registry.families().values():
    _register_auto(_family)
# SAFFU is not a ZooConfig backbone (its layers are solved, not only trained): its own classes.
AutoConfig.register(SAFFUConfig.model_type, SAFFUConfig, exist_ok=True)
AutoModelForCausalLM.register(SAFFUConfig, SAFFUForCausalLM, exist_ok=True)

__all__ = [
    "CosFormer2Config",
    "CosFormer2ForCausalLM",
    "CosFormer2Model",
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
