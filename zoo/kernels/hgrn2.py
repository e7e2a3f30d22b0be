"""The old name of gated linear attention: HGRN2's op is `zoo.kernels.gla` (`gla`, `gla_naive`,
`gla_step`, `gla_chunk_torch`; the decay argument is fla's `g`). These aliases go in 0.3."""

from zoo.kernels.gla import gla as hgrn2
from zoo.kernels.gla import gla_chunk_torch as hgrn2_chunk_torch
from zoo.kernels.gla import gla_naive as hgrn2_naive
from zoo.kernels.gla import gla_step as hgrn2_step

__all__ = ["hgrn2", "hgrn2_chunk_torch", "hgrn2_naive", "hgrn2_step"]
