"""Published scaling laws and their functional forms, as data and plain functions.

Chinchilla (Hoffmann et al., "Training Compute-Optimal Large Language Models", arXiv 2203.15556,
Eq. 10 and App. D.2): L̂(N, D) = E + A / N^α + B / D^β, with N parameters (embeddings
included) and D training tokens. Under C = 6·N·D its efficient frontier is

    N_opt(C) = G · (C/6)^a,   D_opt(C) = G⁻¹ · (C/6)^b,
    G = (α·A / (β·B))^(1/(α+β)),   a = β/(α+β),   b = α/(α+β).

`CHINCHILLA` holds the published fit (E = 1.69, A = 406.4, B = 410.7, α = 0.34, β = 0.28,
a = 0.46) and the replication of Besiroglu et al. ("Chinchilla Scaling: A replication attempt",
arXiv 2404.10102: E = 1.8172, A = 482.01, B = 2085.43, α = 0.3478, β = 0.3658, a ≈ 0.51), which
refits points digitised from Hoffmann's Fig. 4 with the Huber terms summed, not averaged.

Linear-complexity LMs (Shen et al., "Scaling Laws for Linear Complexity Language Models",
arXiv 2406.16690, Table 3): pure power laws y = coef · C^exponent without an irreducible term,
for L(C), N_opt(C) and D_opt(C), with **C in PFLOP/s-days** (1 PF-day = 10^15 · 86 400 =
8.64e19 FLOPs) and N the non-embedding parameters. Their C counts attention and embeddings
(App. A.1), so N_opt · D_opt · 6 is not C: at C = 100 PF-days, LLaMA gives N ≈ 4.8e9,
D ≈ 2.7e11 and 6·N·D ≈ 7.8e21 FLOPs ≈ 0.9 C.

MoE sparsity (Abnar et al., "Parameters vs FLOPs: Scaling Laws for Optimal Sparsity for
Mixture-of-Experts Language Models", arXiv 2501.12370, Eq. 6), with N total parameters and
S = 1 − K/E the fraction of inactive experts:

    L(N, D, S) = a/N^α + b/D^β + c/(1−S)^λ + d/((1−S)^δ · N^γ) + e.

The paper's fitted values (App. F, Table 3) were not found, so no constants are given here;
the paper only states λ < 0.

MAD (Poli et al., "Mechanistic Design and Scaling of Hybrid Architectures", arXiv 2403.17844)
reports compute-optimal perplexity P* ∝ M^c against total inference state M with c ≈ −0.28
(quoted through a third-party note, not verified against the paper).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import ArrayLike

PF_DAY_FLOPS = 1e15 * 86_400
"""FLOPs in one PFLOP/s-day: 8.64e19."""

MAD_STATE_EXPONENT = -0.28
"""c in P* ∝ M^c (MAD, via a third-party note; unverified)."""


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = coef · x^exponent."""

    coef: float
    exponent: float

    def __call__(self, x: ArrayLike) -> np.ndarray | float:
        return self.coef * np.asarray(x, dtype=float) ** self.exponent

    def inverse(self, y: ArrayLike) -> np.ndarray | float:
        """The x at which the law reaches y."""
        return (np.asarray(y, dtype=float) / self.coef) ** (1.0 / self.exponent)


def chinchilla_loss(
    N: ArrayLike, D: ArrayLike, E: float, A: float, B: float, alpha: float, beta: float
) -> np.ndarray | float:
    """E + A/N^α + B/D^β."""
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    return E + A / N**alpha + B / D**beta


def chinchilla_frontier(
    A: float, B: float, alpha: float, beta: float
) -> tuple[float, float, float]:
    """(G, a, b) of the efficient frontier N_opt = G (C/6)^a, D_opt = G⁻¹ (C/6)^b under C = 6ND."""
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    return G, beta / (alpha + beta), alpha / (alpha + beta)


@dataclasses.dataclass(frozen=True)
class ChinchillaLaw:
    """L̂(N, D) = E + A/N^α + B/D^β and its compute-optimal frontier under C = 6ND."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def loss(self, N: ArrayLike, D: ArrayLike) -> np.ndarray | float:
        return chinchilla_loss(N, D, self.E, self.A, self.B, self.alpha, self.beta)

    @property
    def G(self) -> float:
        return chinchilla_frontier(self.A, self.B, self.alpha, self.beta)[0]

    @property
    def a(self) -> float:
        """N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt ∝ C^b."""
        return self.alpha / (self.alpha + self.beta)

    def n_opt(self, C: ArrayLike) -> np.ndarray | float:
        """Compute-optimal parameters at C FLOPs (C = 6ND)."""
        return self.G * (np.asarray(C, dtype=float) / 6.0) ** self.a

    def d_opt(self, C: ArrayLike) -> np.ndarray | float:
        """Compute-optimal tokens at C FLOPs (C = 6ND)."""
        return (np.asarray(C, dtype=float) / 6.0) ** self.b / self.G

    def loss_opt(self, C: ArrayLike) -> np.ndarray | float:
        """Loss on the frontier at C FLOPs."""
        return self.loss(self.n_opt(C), self.d_opt(C))


CHINCHILLA: dict[str, ChinchillaLaw] = {
    "hoffmann2022": ChinchillaLaw(
        E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, source="arXiv 2203.15556 Eq. 10"
    ),
    "besiroglu2024": ChinchillaLaw(
        E=1.8172,
        A=482.01,
        B=2085.43,
        alpha=0.3478,
        beta=0.3658,
        source="arXiv 2404.10102 (refit of Hoffmann Fig. 4, Huber terms summed)",
    ),
}
"""Chinchilla's approach-3 law as published, and Besiroglu et al.'s replication."""


@dataclasses.dataclass(frozen=True)
class ComputeLaws:
    """Shen et al.'s three laws for one architecture; C in PFLOP/s-days, N non-embedding."""

    loss: PowerLaw
    n_opt: PowerLaw
    d_opt: PowerLaw


SHEN_2024: dict[str, ComputeLaws] = {
    "llama": ComputeLaws(
        loss=PowerLaw(3.7087, -0.0798),
        n_opt=PowerLaw(1.82e8, 0.7118),
        d_opt=PowerLaw(2.56e10, 0.5102),
    ),
    "tnl": ComputeLaws(
        loss=PowerLaw(3.5391, -0.0768),
        n_opt=PowerLaw(2.74e8, 0.6470),
        d_opt=PowerLaw(4.43e10, 0.4684),
    ),
    "hgrn2": ComputeLaws(
        loss=PowerLaw(3.4788, -0.0753),
        n_opt=PowerLaw(2.66e8, 0.6427),
        d_opt=PowerLaw(4.80e10, 0.4500),
    ),
    "cosformer2": ComputeLaws(
        loss=PowerLaw(3.5877, -0.0756),
        n_opt=PowerLaw(2.65e8, 0.6516),
        d_opt=PowerLaw(4.23e10, 0.4529),
    ),
}
"""Shen et al. (arXiv 2406.16690) Table 3, keyed by the zoo's family names."""


def sparsity_loss(
    N: ArrayLike,
    D: ArrayLike,
    S: ArrayLike,
    a: float,
    alpha: float,
    b: float,
    beta: float,
    c: float,
    lam: float,
    d: float,
    delta: float,
    gamma: float,
    e: float,
) -> np.ndarray | float:
    """Abnar et al. Eq. 6: a/N^α + b/D^β + c/(1−S)^λ + d/((1−S)^δ N^γ) + e (N total params)."""
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    dense = 1.0 - np.asarray(S, dtype=float)
    return a / N**alpha + b / D**beta + c / dense**lam + d / (dense**delta * N**gamma) + e
