"""Known answers and properties of the closed forms in `toymesa.meter.closed_forms` (theory/meter.md).

Pure NumPy/SciPy, no JAX programs: the whole file runs in a few seconds.
"""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from scipy.optimize import minimize
from scipy.stats import ortho_group

from toymesa.meter.closed_forms import (
    dln,
    dln_min_norm,
    dln_params,
    kt_code_bits,
    kt_predict,
    monomial_product,
    monomial_sum,
    normal_crossing,
    regular,
    rrr,
)


def _rrr_cases(top=6):
    """Every (M, H, N, r) with 1 <= M, H, N <= top and 0 <= r <= min(M, H, N)."""
    for M, H, N in itertools.product(range(1, top + 1), repeat=3):
        for r in range(min(M, H, N) + 1):
            yield M, H, N, r


def _dln_cases():
    """Every widths tuple with L = 1..4 layers (widths 1..5, 1..4 for L = 4) and every admissible rank."""
    for L, top in ((1, 5), (2, 5), (3, 5), (4, 4)):
        for widths in itertools.product(range(1, top + 1), repeat=L + 1):
            for r in range(min(widths) + 1):
                yield widths, r


# ------------------------------------------------------------------------------- regular, monomials


def test_regular_and_monomials_known_values():
    assert regular(0) == 0 and regular(7) == 3.5
    for d in range(1, 8):
        assert monomial_sum([1] * d) == regular(d)  # K = |w|²: the regular case
    assert monomial_sum([1, 2]) == 0.5 + 0.25
    assert monomial_sum([2, 2, 3]) == 0.25 + 0.25 + 1 / 6
    assert monomial_product([1, 2]) == 0.25
    assert monomial_product([3, 1, 2]) == 1 / 6
    assert monomial_product([1]) == 0.5


def test_monomial_sum_is_additive_over_independent_blocks():
    a, b = [1, 2, 3], [2, 5]
    assert monomial_sum(a + b) == pytest.approx(monomial_sum(a) + monomial_sum(b), rel=1e-15)


def test_normal_crossing_known_values():
    for ks in ([1, 2], [3, 1, 2], [2, 2]):
        assert normal_crossing(ks) == monomial_product(ks) == normal_crossing(ks, [0] * len(ks))
    assert normal_crossing([1, 2], [0, 3]) == 0.5  # min(1/2, 4/4): the prior moves the minimum to w_1
    assert normal_crossing([1, 2], [1, 0]) == 0.25  # min(2/2, 1/4)
    assert normal_crossing([2, 1], [3, 2]) == 1.0  # min(4/4, 3/2)
    assert normal_crossing([1], [-0.5]) == 0.25  # an integrable prior singular at 0


def _volume_slope(K_sub, t_hi=1e-12, t_lo=1e-14):
    """d log V / d log t between t_lo and t_hi, with V(t) = ∫_0^1 K_sub(w2, t) dw2 computed by quadrature."""

    def V(t):
        return integrate.quad(lambda w2: K_sub(w2, t), 0, 1, limit=400, epsabs=0, epsrel=1e-11, points=[t**0.5, t**0.25, t**0.125])[0]

    return math.log(V(t_hi) / V(t_lo)) / math.log(t_hi / t_lo)


@pytest.mark.parametrize(("k1", "k2", "h1", "h2"), [(1, 2, 0, 0), (1, 2, 0, 3), (2, 1, 3, 2), (1, 3, 1, 0)])
def test_normal_crossing_matches_volume_scaling(k1, k2, h1, h2):
    """V(t) = ∫_{[0,1]², K < t} φ ∝ t^λ for small t (unique minimum, multiplicity 1): measure the exponent by quadrature.

    K = w1^(2k1) w2^(2k2), φ = w1^h1 w2^h2; the w1-integral is done in closed form:
    ∫_0^u w1^h1 dw1 = u^(h1+1)/(h1+1) with u = min(1, (t / w2^(2k2)))^(1/(2k1))).
    """

    def inner(w2, t):
        u = min(1.0, (t / w2 ** (2 * k2)) ** (1 / (2 * k1))) if w2 > 0 else 1.0
        return w2**h2 * u ** (h1 + 1) / (h1 + 1)

    lam = normal_crossing([k1, k2], [h1, h2])
    assert _volume_slope(inner) == pytest.approx(lam, rel=0.02)


@pytest.mark.parametrize(("k1", "k2"), [(1, 1), (1, 2), (2, 3)])
def test_monomial_sum_matches_volume_scaling(k1, k2):
    """V(t) = area{w ∈ [0,1]²: w1^(2k1) + w2^(2k2) < t} scales exactly as t^(1/(2k1) + 1/(2k2)) for t <= 1."""

    def inner(w2, t):
        rest = t - w2 ** (2 * k2)
        return rest ** (1 / (2 * k1)) if rest > 0 else 0.0

    assert _volume_slope(inner, 1e-2, 1e-4) == pytest.approx(monomial_sum([k1, k2]), rel=1e-6)


# ------------------------------------------------------------------------------ reduced-rank regression


@pytest.mark.parametrize(
    ("M", "H", "N", "r", "expected"),
    [
        (2, 1, 2, 0, (2 * 1 * 4 - 0 - 1 + 1) / 8),  # regime 1, M+H+N+r = 5 odd: the +1 counts
        (3, 2, 3, 0, (2 * 2 * 6 - 0 - 4) / 8),  # regime 1, even
        (5, 3, 4, 1, (2 * 4 * 9 - 1 - 16 + 1) / 8),  # regime 1, odd, M != N
        (4, 4, 6, 1, (2 * 5 * 10 - 4 - 25 + 1) / 8),  # regime 1, odd
        (3, 2, 7, 1, (2 * 3 - 2 * 1 + 7 * 1) / 2),  # regime 2: M + H < N + r
        (7, 2, 3, 1, (2 * 3 - 2 * 1 + 7 * 1) / 2),  # regime 3: N + H < M + r (the mirror of the case above)
        (6, 1, 2, 0, (1 * 2) / 2),  # regime 3, r = 0
        (2, 6, 3, 1, (2 * 3) / 2),  # regime 4: H + r > M + N, λ = MN/2
    ],
)
def test_rrr_known_values(M, H, N, r, expected):
    assert rrr(M, H, N, r) == expected


def test_rrr_parity_term_matters():
    """The +1 for odd M+H+N+r: without it λ would be 7/8 at (2, 1, 2, 0); every regime-1 value is a multiple of 1/8 with this parity rule."""
    assert rrr(2, 1, 2, 0) == 1.0
    for M, H, N, r in _rrr_cases():
        if N + r <= M + H and M + r <= N + H and H + r <= M + N:
            eighths = rrr(M, H, N, r) * 8
            assert eighths == round(eighths)
            assert (round(eighths) - (2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2)) == (M + H + N + r) % 2


# ------------------------------------------------------------------------------ deep linear networks


def test_dln_two_layers_equals_rrr():
    """Aoyagi 2024 Theorem 1 with L = 2, widths (M, H, N), reduces to Aoyagi & Watanabe 2005 on every case."""
    for M, H, N, r in _rrr_cases():
        assert dln((M, H, N), r) == rrr(M, H, N, r), (M, H, N, r)


def test_dln_one_layer_is_regular():
    """L = 1: y = W x is a regular model with MN parameters, whatever the true rank."""
    for M, N in itertools.product(range(1, 7), repeat=2):
        for r in range(min(M, N) + 1):
            assert dln((M, N), r) == regular(M * N) == dln_params((M, N)) / 2


@pytest.mark.parametrize(
    ("widths", "r", "expected"),
    [
        ((2, 2, 2, 2), 0, 1.5),  # S = everything, ℓ = 3, Σ = 8, a = 2: 2/12 − 32/3 + 12
        ((1, 2, 3, 4), 0, 1.0),  # S = {1, 2, 3}, ℓ = 2, a = 2: 0 − 9/2 + 11/2
        ((2, 2, 3, 3), 0, 2.0),  # ℓ = 3, Σ = 10, a = 1: 1/6 − 50/3 + 37/2
        ((2, 2, 3, 3), 1, 2.5),  # M_s = (1, 1, 2, 2), ℓ = 3, a = 3: 2 − 6 + 13/2
    ],
)
def test_dln_known_values(widths, r, expected):
    """Deeper cases worked by hand from Theorem 1 (comments: the index set S and the terms)."""
    assert dln(widths, r) == pytest.approx(expected, abs=1e-12)


def test_dln_params():
    assert dln_params((3, 5)) == 15
    assert dln_params((2, 3, 4)) == 6 + 12
    assert dln_params((1, 2, 3, 4)) == 2 + 6 + 12


def test_learning_coefficient_bounds():
    """r(H_1 + H_(L+1) − r)/2 <= λ <= d/2; the upper bound is attained only by the regular L = 1 case."""
    for M, H, N, r in _rrr_cases():
        lam, d = rrr(M, H, N, r), H * (M + N)
        assert r * (M + N - r) / 2 <= lam < d / 2, (M, H, N, r)
    for widths, r in _dln_cases():
        lam, d = dln(widths, r), dln_params(widths)
        assert r * (widths[0] + widths[-1] - r) / 2 <= lam <= d / 2, (widths, r)
        assert (lam == d / 2) == (len(widths) == 2), (widths, r)


def test_lower_bound_attained_at_bottleneck_rank():
    """r = min(widths): λ = r(H_1 + H_(L+1) − r)/2, half the dimension of the rank-r matrices (Theorem 1 with S = {0, ties})."""
    for widths, r in _dln_cases():
        if r == min(widths):
            assert dln(widths, r) == r * (widths[0] + widths[-1] - r) / 2, widths


def test_learning_coefficient_non_decreasing_in_rank():
    for M, H, N in itertools.product(range(1, 7), repeat=3):
        lams = [rrr(M, H, N, r) for r in range(min(M, H, N) + 1)]
        assert lams == sorted(lams), (M, H, N)
    for widths, r in _dln_cases():
        if r < min(widths):
            assert dln(widths, r) <= dln(widths, r + 1), (widths, r)


def test_reversal_symmetry():
    """The transposed network (y ↦ x, widths reversed) has the same λ."""
    for M, H, N, r in _rrr_cases():
        assert rrr(M, H, N, r) == rrr(N, H, M, r)
    for widths, r in _dln_cases():
        assert dln(widths[::-1], r) == dln(widths, r)
        assert dln_params(widths[::-1]) == dln_params(widths)


# ------------------------------------------------------------------------ minimum-norm factorisation


def _balanced_factors(M, L, rng):
    """W_l = U_l Σ^(1/L) U_(l-1)^T with U_0 = V, U_L = U (M = U Σ V^T) and random orthogonal U_1..U_(L-1) of size rank(M)."""
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    k = int(np.sum(s > 1e-12 * s.max()))
    U, root, Vt = U[:, :k], np.diag(s[:k] ** (1 / L)), Vt[:k]
    frames = [Vt.T] + [ortho_group.rvs(k, random_state=rng) if k > 1 else np.ones((1, 1)) for _ in range(L - 1)] + [U]
    return [frames[j + 1] @ root @ frames[j].T for j in range(L)]


@pytest.mark.parametrize("L", [1, 2, 3, 4])
def test_dln_min_norm_attained_by_balanced_factorisation(L):
    rng = np.random.default_rng(L)
    for M in (rng.normal(size=(3, 3)), rng.normal(size=(2, 4)), rng.normal(size=(4, 2)) @ rng.normal(size=(2, 5))):
        Ws = _balanced_factors(M, L, rng)
        product = np.linalg.multi_dot(Ws[::-1]) if L > 1 else Ws[0]
        np.testing.assert_allclose(product, M, atol=1e-5)
        assert sum(np.sum(W**2) for W in Ws) == pytest.approx(dln_min_norm(M, L), abs=1e-6)
    # an unbalanced factorisation (W_1 = M, the rest identity) costs more
    M = rng.normal(size=(3, 3))
    assert np.sum(M**2) + 3 * (L - 1) >= dln_min_norm(M, L) - 1e-12


def test_dln_min_norm_special_cases():
    rng = np.random.default_rng(0)
    M = rng.normal(size=(3, 4))
    s = np.linalg.svd(M, compute_uv=False)
    assert dln_min_norm(M, 1) == pytest.approx(np.sum(M**2), rel=1e-12)  # L = 1: the Frobenius norm
    assert dln_min_norm(M, 2) == pytest.approx(2 * np.linalg.norm(M, "nuc"), rel=1e-12)  # L = 2: twice the nuclear norm
    assert dln_min_norm(s, 3) == pytest.approx(dln_min_norm(M, 3), rel=1e-12)  # singular values or the matrix
    assert dln_min_norm(np.zeros((2, 2)), 3) == 0.0


def _eliminated_objective(x, M, L):
    """Σ_l ‖W_l‖² over factorisations W_L ⋯ W_1 = M, with W_2..W_L free (square, from x) and W_1 = (W_L ⋯ W_2)^(-1) M.

    The constraint holds exactly by construction. Returns the value and its gradient: with
    P = W_L ⋯ W_2, ∂‖W_1‖²/∂P = −2 P^(-T) W_1 W_1^T, and ∂/∂W_l = A_l^T (∂/∂P) B_l^T for
    P = A_l W_l B_l.
    """
    n = M.shape[0]
    Ws = list(x.reshape(L - 1, n, n))
    below = [np.eye(n)]  # below[j] = W_(j+1) ⋯ W_2 (empty product: I)
    for W in Ws:
        below.append(W @ below[-1])
    P = below[-1]
    W1 = np.linalg.solve(P, M)
    gP = -2 * np.linalg.solve(P.T, W1 @ W1.T)
    above, grads = np.eye(n), [None] * (L - 1)
    for j in range(L - 2, -1, -1):  # above = W_L ⋯ W_(j+3), the factors after W_(j+2)
        grads[j] = 2 * Ws[j] + above.T @ gP @ below[j].T
        above = above @ Ws[j]
    value = sum(np.sum(W**2) for W in Ws) + np.sum(W1**2)
    return value, np.concatenate([g.ravel() for g in grads])


@pytest.mark.parametrize("L", [2, 3, 4])
def test_dln_min_norm_reached_by_descent_from_random_starts(L):
    """Quasi-Newton descent (L-BFGS) on the constraint-eliminated objective, from random starts, ends within 1% of the formula and never below it."""
    for seed in range(4):
        rng = np.random.default_rng(10 * L + seed)
        M = rng.normal(size=(3, 3))
        x0 = rng.normal(size=(L - 1) * 9)
        # the analytic gradient against central differences
        value, grad = _eliminated_objective(x0, M, L)
        h, basis = 1e-6, np.eye(x0.size)
        fd = np.array([(_eliminated_objective(x0 + h * e, M, L)[0] - _eliminated_objective(x0 - h * e, M, L)[0]) / (2 * h) for e in basis])
        np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(grad).max()))
        res = minimize(_eliminated_objective, x0, args=(M, L), jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-10, "ftol": 1e-15})
        best = dln_min_norm(M, L)
        assert best * (1 - 1e-9) <= res.fun <= best * 1.01, (seed, res.fun, best, res.message)


# ------------------------------------------------------------------------------- Krichevsky–Trofimov


@settings(deadline=None, max_examples=50)
@given(st.lists(st.booleans(), max_size=400))
def test_kt_code_equals_sequential_predictor(bits):
    n0 = n1 = 0
    total = 0.0
    for b in bits:
        p1 = kt_predict(n0, n1)
        total -= math.log2(p1 if b else 1 - p1)
        n0, n1 = n0 + (not b), n1 + b
    assert total == pytest.approx(kt_code_bits(n0, n1), abs=1e-9, rel=0)


def test_kt_known_values_and_symmetry():
    assert kt_code_bits(0, 0) == pytest.approx(0.0, abs=1e-12)  # the empty sequence
    assert kt_code_bits(1, 0) == pytest.approx(1.0, abs=1e-12)  # p = 1/2
    assert kt_code_bits(1, 1) == pytest.approx(3.0, abs=1e-12)  # 1/2 · 1/4
    assert kt_code_bits(2, 0) == pytest.approx(math.log2(8 / 3), abs=1e-12)  # 1/2 · 3/4
    assert kt_predict(0, 0) == 0.5 and kt_predict(3, 1) == 1.5 / 5 and kt_predict(1, 3) == 3.5 / 5
    for n0, n1 in itertools.product(range(0, 40, 3), range(0, 40, 5)):
        assert kt_code_bits(n0, n1) == pytest.approx(kt_code_bits(n1, n0), rel=1e-14, abs=1e-12)


def _entropy_bits(n0, n1):
    n = n0 + n1
    return -sum(c * math.log2(c / n) for c in (n0, n1) if c)


def test_kt_code_grows_like_half_log_n_plus_n_entropy():
    """0 <= KT − n·H(p̂) − ½log₂ n <= 1 (upper: Willems, Shtarkov & Tjalkens 1995); interior limit ½log₂(π/2) (Rissanen 1996)."""
    for n in range(1, 200):
        for n1 in range(n + 1):
            excess = kt_code_bits(n - n1, n1) - _entropy_bits(n - n1, n1) - 0.5 * math.log2(n)
            assert 0 <= excess <= 1 + 1e-12, (n, n1)
    n = 10**6
    for n1 in (n // 10, 3 * n // 10, n // 2):
        excess = kt_code_bits(n - n1, n1) - _entropy_bits(n - n1, n1) - 0.5 * math.log2(n)
        assert excess == pytest.approx(0.5 * math.log2(math.pi / 2), abs=1e-3)
    assert math.isfinite(kt_code_bits(10**12, 3 * 10**12))  # gammaln: no overflow


# ------------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: regular(-1), "d"),
        (lambda: regular(2.5), "d"),
        (lambda: monomial_sum([]), "ks"),
        (lambda: monomial_product([1, 0]), r"ks\[1\]"),
        (lambda: normal_crossing([1, 2], [0]), "hs"),
        (lambda: normal_crossing([1], [-1]), r"hs\[0\]"),
        (lambda: rrr(0, 1, 1, 0), "M"),
        (lambda: rrr(2, 2.0, 2, 0), "H"),
        (lambda: rrr(2, 2, -3, 0), "N"),
        (lambda: rrr(2, 2, 2, -1), "r"),
        (lambda: rrr(4, 2, 4, 3), "r"),
        (lambda: rrr(1, 3, 4, 2), "r"),
        (lambda: rrr(True, 2, 2, 0), "M"),
        (lambda: dln((3,), 0), "widths"),
        (lambda: dln((3, 0, 2), 0), r"widths\[1\]"),
        (lambda: dln((2, 3, 4), 3), "r"),
        (lambda: dln_params("abc"), "widths"),
        (lambda: dln_min_norm(np.eye(2), 0), "L"),
        (lambda: dln_min_norm(np.zeros((2, 2, 2)), 2), "M"),
        (lambda: dln_min_norm([1.0, -1.0], 2), "singular values"),
        (lambda: kt_code_bits(-1, 0), "n0"),
        (lambda: kt_predict(0, 1.5), "n1"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"(^|\W){name}(\W|$)"):
        call()
