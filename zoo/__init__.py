"""hybrid-zoo: efficient sequence models (TNL, HGRN2, cosFormer2, Mamba, Hyena, LLaMA, hybrids).

`import zoo` registers every family with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(path)` loads zoo checkpoints.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

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
    FAMILIES,
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
)
from zoo.saffu.model import SAFFUConfig, SAFFUForCausalLM

for _config, _model, _lm in FAMILIES:
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)
# SAFFU is not a ZooConfig backbone (its layers are solved, not only trained): its own classes.
AutoConfig.register(SAFFUConfig.model_type, SAFFUConfig, exist_ok=True)
AutoModelForCausalLM.register(SAFFUConfig, SAFFUForCausalLM, exist_ok=True)

__version__ = "0.1.0"
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
    "TNLConfig",
    "TNLForCausalLM",
    "TNLModel",
    "ZooConfig",
    "ZooForCausalLM",
    "ZooModel",
]
