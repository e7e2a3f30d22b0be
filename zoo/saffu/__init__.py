"""SAFFU (Williams & Zhao, arXiv 2311.07510): explicit-solution warm start, then backprop.

model.py       the explicit solution of a softmax layer, the SAFFU unit as a transformers model
               (`zoo_saffu`, through the Auto classes), the warm start `solve`
experiment.py  warm start + backprop against backprop alone over a grid, JSONL logs, plots
"""

from zoo.saffu.model import (
    SAFFUConfig,
    SAFFUForCausalLM,
    TokenDocuments,
    explicit_softmax_solution,
    solve,
)

__all__ = [
    "SAFFUConfig",
    "SAFFUForCausalLM",
    "TokenDocuments",
    "explicit_softmax_solution",
    "solve",
]
