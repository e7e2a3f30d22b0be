import numpy as np
import pytest

from zoo.scaling.laws import (
    CHINCHILLA,
    PF_DAY_FLOPS,
    SHEN_2024,
    ChinchillaLaw,
    PowerLaw,
    chinchilla_frontier,
    chinchilla_loss,
    sparsity_loss,
)


def test_pf_day_is_8_64e19_flops():
    assert pytest.approx(8.64e19) == PF_DAY_FLOPS


def test_shen_llama_laws_reproduce_the_papers_check_at_100_pf_days():
    laws = SHEN_2024["llama"]
    N, D = laws.n_opt(100), laws.d_opt(100)
    assert pytest.approx(4.8e9, rel=0.02) == N
    assert pytest.approx(2.7e11, rel=0.02) == D
    assert pytest.approx(7.8e21, rel=0.02) == 6 * N * D
    # "≈ C": their C counts attention and embeddings, so 6ND falls ~10% short of it.
    assert 0.85 < 6 * N * D / (100 * PF_DAY_FLOPS) < 1.0


@pytest.mark.parametrize("family", ["llama", "tnl", "hgrn2", "cosformer2"])
def test_shen_laws_decrease_loss_and_grow_n_and_d_with_compute(family):
    laws = SHEN_2024[family]
    C = np.array([1.0, 10.0, 100.0])
    assert np.all(np.diff(laws.loss(C)) < 0)
    assert np.all(np.diff(laws.n_opt(C)) > 0) and np.all(np.diff(laws.d_opt(C)) > 0)


def test_linear_models_reach_lower_loss_than_llama_at_equal_compute():
    C = np.geomspace(1, 1e3, 5)
    for family in ("tnl", "hgrn2", "cosformer2"):
        assert np.all(SHEN_2024[family].loss(C) < SHEN_2024["llama"].loss(C))


def test_chinchilla_frontier_exponents_from_published_alpha_beta():
    law = CHINCHILLA["hoffmann2022"]
    # The rounded α = 0.34, β = 0.28 give a = 0.452; the paper's 0.46 / 0.54 come from the
    # unrounded α = 0.3392, β = 0.2849.
    assert law.a == pytest.approx(0.46, abs=0.01) and law.b == pytest.approx(0.54, abs=0.01)
    _, a, b = chinchilla_frontier(law.A, law.B, 0.3392, 0.2849)
    assert (round(a, 2), round(b, 2)) == (0.46, 0.54)
    assert CHINCHILLA["besiroglu2024"].a == pytest.approx(0.513, abs=0.002)


@pytest.mark.parametrize("source", ["hoffmann2022", "besiroglu2024"])
def test_chinchilla_frontier_minimises_loss_at_fixed_compute(source):
    law = CHINCHILLA[source]
    for C in (1e19, 1e22, 1e24):
        N = np.geomspace(law.n_opt(C) / 10, law.n_opt(C) * 10, 20001)
        losses = law.loss(N, C / (6 * N))
        assert N[np.argmin(losses)] == pytest.approx(law.n_opt(C), rel=1e-3)
        assert 6 * law.n_opt(C) * law.d_opt(C) == pytest.approx(C)
        assert law.loss_opt(C) == pytest.approx(losses.min(), rel=1e-9)


def test_chinchilla_loss_matches_the_law_object():
    law = ChinchillaLaw(E=1.5, A=300.0, B=500.0, alpha=0.3, beta=0.35)
    N, D = np.array([1e8, 1e9]), np.array([1e10, 3e11])
    expected = 1.5 + 300.0 / N**0.3 + 500.0 / D**0.35
    assert law.loss(N, D) == pytest.approx(expected)
    assert chinchilla_loss(N, D, 1.5, 300.0, 500.0, 0.3, 0.35) == pytest.approx(expected)


def test_sparsity_loss_is_chinchilla_plus_constant_when_dense():
    N, D = np.array([1e8, 3e9]), np.array([2e10, 1e11])
    p = dict(a=400.0, alpha=0.34, b=410.0, beta=0.28, c=0.4, lam=-0.2, d=10.0, delta=0.15)
    dense = sparsity_loss(N, D, 0.0, **p, gamma=0.2, e=1.5)
    expected = chinchilla_loss(N, D, 1.5 + 0.4, 400.0, 410.0, 0.34, 0.28) + 10.0 / N**0.2
    assert dense == pytest.approx(expected)
    # λ < 0: the c-term falls as S → 1, the d-term (δ > 0) rises.
    sparse = sparsity_loss(N, D, 0.9, **p, gamma=0.2, e=1.5)
    assert np.all(
        sparse - dense == pytest.approx(0.4 * (0.1**0.2 - 1) + 10 / N**0.2 * (0.1**-0.15 - 1))
    )


def test_power_law_inverse():
    law = PowerLaw(2.0, 0.5)
    assert law.inverse(law(np.array([3.0, 40.0]))) == pytest.approx([3.0, 40.0])
