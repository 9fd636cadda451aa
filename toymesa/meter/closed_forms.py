"""Closed-form learning coefficients and code lengths: the known answers each meter is checked against.

Learning coefficients λ (real log canonical thresholds): the coefficient of log n in the Bayes free
energy F_n ≈ n·L_n(w*) + λ·log n. Closed forms here: regular models, monomials and normal
crossings, reduced-rank regression (Aoyagi & Watanabe 2005) and deep linear networks (Aoyagi 2024).
Code lengths: the minimum Σ‖W_l‖_F² of a deep linear factorisation (the Gaussian-prior half of a
two-part code) and the Krichevsky–Trofimov code of a binary sequence.

Everything is plain Python/NumPy/SciPy; learning coefficients are computed exactly in rationals
(`fractions.Fraction`) and returned as floats. Bad arguments raise `ValueError` naming the argument.
Propositions, sources and the tests that check them: `theory/meter.md`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
from scipy.special import gammaln

__all__ = [
    "regular",
    "monomial_sum",
    "monomial_product",
    "normal_crossing",
    "rrr",
    "dln",
    "dln_params",
    "dln_min_norm",
    "kt_code_bits",
    "kt_predict",
]


# ---------------------------------------------------------------------------------------- validation


def _int(fn: str, name: str, value, *, minimum: int, meaning: str) -> int:
    """`value` as an int >= minimum, or a ValueError naming `fn`'s argument `name` and saying how to fix it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{fn}: {name} ({meaning}) must be an integer, got {value!r} of type {type(value).__name__}; pass e.g. {name}={max(minimum, 1)}")
    if value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{fn}: {name} ({meaning}) must be {kind}, got {value}")
    return int(value)


def _exponents(fn: str, name: str, values) -> list[Fraction]:
    """A non-empty sequence of positive finite exponents (ints, floats or Fractions) as exact Fractions."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise ValueError(f"{fn}: {name} must be a non-empty sequence of positive exponents, got {values!r}; pass e.g. {name}=[1, 2]")
    out = []
    for i, k in enumerate(values):
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(k) or k <= 0:
            raise ValueError(f"{fn}: {name}[{i}] must be a positive finite number (the power k in w^(2k)), got {k!r}")
        out.append(Fraction(k))
    if not out:
        raise ValueError(f"{fn}: {name} must be non-empty (one exponent per parameter), got an empty sequence")
    return out


def _widths(fn: str, widths) -> list[int]:
    if isinstance(widths, str | bytes) or not isinstance(widths, Sequence | np.ndarray):
        raise ValueError(f"{fn}: widths must be a sequence (H_1, ..., H_(L+1)) of positive integers, input width first, got {widths!r}")
    out = [_int(fn, f"widths[{i}]", h, minimum=1, meaning="a layer width") for i, h in enumerate(widths)]
    if len(out) < 2:
        raise ValueError(f"{fn}: widths needs at least 2 entries (input and output width, L = len(widths) - 1 >= 1 layers), got {list(widths)!r}")
    return out


# ----------------------------------------------------------------------------- learning coefficients


def regular(d: int) -> float:
    """Learning coefficient of a regular model with d parameters: λ = d/2.

    Source: Watanabe 2009 (Algebraic Geometry and Statistical Learning Theory, CUP), the regular
    case of the main formula; equivalently the BIC penalty (d/2)·log n (Schwarz 1978).
    Condition: the Fisher information at the true parameter is positive definite.

    Args:
        d: number of parameters, an integer >= 0.
    """
    return _int("regular", "d", d, minimum=0, meaning="the number of parameters") / 2


def monomial_sum(ks: Sequence[float]) -> float:
    """Learning coefficient of K(w) = Σ_i w_i^(2k_i) at w = 0: λ = Σ_i 1/(2k_i).

    Source: Watanabe 2009 (Algebraic Geometry and Statistical Learning Theory, CUP), the standard
    quasi-homogeneous example: the substitution w_i = t^(1/(2k_i))·u_i scales K by t, so the
    zeta function ∫K^z φ dw has its largest pole at z = −Σ 1/(2k_i). Used as a sampler check by
    Lau, Furman, Wang, Murfet & Wei (AISTATS 2025). With every k_i = 1 this is `regular(len(ks))`.
    Condition: the prior density is positive and smooth at 0.

    Args:
        ks: the positive exponents k_i, one per parameter.
    """
    return float(sum(1 / (2 * k) for k in _exponents("monomial_sum", "ks", ks)))


def monomial_product(ks: Sequence[float]) -> float:
    """Learning coefficient of K(w) = Π_i w_i^(2k_i) at w = 0: λ = min_i 1/(2k_i).

    Source: Watanabe 2009 (Algebraic Geometry and Statistical Learning Theory, CUP): K is already
    in normal-crossing form; this is `normal_crossing(ks)` with a prior positive at 0 (every h_i = 0).
    The multiplicity (power of log log n) is the number of i attaining the minimum.

    Args:
        ks: the positive exponents k_i, one per parameter.
    """
    return float(min(1 / (2 * k) for k in _exponents("monomial_product", "ks", ks)))


def normal_crossing(ks: Sequence[float], hs: Sequence[float] | None = None) -> float:
    """Learning coefficient of a normal crossing: K(w) = Π_j w_j^(2k_j), prior φ(w) ∝ Π_j |w_j|^(h_j): λ = min_j (h_j + 1)/(2k_j).

    Source: Watanabe 2009 (Algebraic Geometry and Statistical Learning Theory, CUP), the normal-
    crossing form reached by resolution of singularities: the zeta function
    ζ(z) = ∫ Π_j |w_j|^(2k_j z + h_j) dw on a neighbourhood of 0 factorises, and its j-th factor
    has its pole at z = −(h_j + 1)/(2k_j); λ is minus the largest pole. Also Watanabe 2018
    (Mathematical Theory of Bayesian Statistics, CRC), Ch. 6. The multiplicity is the number of j
    attaining the minimum.

    Args:
        ks: positive exponents k_j of the loss, one per coordinate.
        hs: prior exponents h_j > -1 (the prior must be integrable), same length as ks;
            None means h_j = 0 for all j (a prior positive at 0), giving `monomial_product(ks)`.
    """
    k = _exponents("normal_crossing", "ks", ks)
    if hs is None:
        h = [Fraction(0)] * len(k)
    else:
        if isinstance(hs, str | bytes) or not isinstance(hs, Sequence | np.ndarray) or len(hs) != len(k):
            raise ValueError(f"normal_crossing: hs must be a sequence of the same length as ks ({len(k)}), one prior exponent per coordinate, got {hs!r}")
        h = []
        for i, hj in enumerate(hs):
            if isinstance(hj, bool) or not isinstance(hj, numbers.Real) or not math.isfinite(hj) or hj <= -1:
                raise ValueError(f"normal_crossing: hs[{i}] must be a finite number > -1 (else the prior |w|^h is not integrable at 0), got {hj!r}")
            h.append(Fraction(hj))
    return float(min((hj + 1) / (2 * kj) for kj, hj in zip(k, h, strict=True)))


def rrr(M: int, H: int, N: int, r: int) -> float:
    """Learning coefficient of reduced-rank regression y = B A x at a true map of rank r.

    A is H×M, B is N×H (M inputs, H hidden, N outputs; d = H(M + N) parameters). With
    s = M + H + N + r:

    - if N + r <= M + H, M + r <= N + H and H + r <= M + N:
      λ = [2(H + r)(M + N) − (M − N)² − (H + r)² + (1 if s is odd else 0)] / 8;
    - else if M + H < N + r: λ = (HM − Hr + Nr)/2;
    - else if N + H < M + r: λ = (HN − Hr + Mr)/2;
    - else (H + r > M + N): λ = MN/2.

    Source: Aoyagi & Watanabe 2005, "Stochastic complexities of reduced rank regression in
    Bayesian estimation", Neural Networks 18(7):924-933, Main Theorem. Condition: the prior is
    positive and smooth at the true parameter. Equals `dln((M, H, N), r)`.

    Args:
        M: input dimension (columns of A), a positive integer.
        H: hidden dimension (rows of A, columns of B), a positive integer.
        N: output dimension (rows of B), a positive integer.
        r: rank of the true map B₀A₀, 0 <= r <= min(M, H, N).
    """
    M = _int("rrr", "M", M, minimum=1, meaning="the input dimension")
    H = _int("rrr", "H", H, minimum=1, meaning="the hidden dimension")
    N = _int("rrr", "N", N, minimum=1, meaning="the output dimension")
    r = _int("rrr", "r", r, minimum=0, meaning="the true rank")
    if r > min(M, H, N):
        raise ValueError(f"rrr: r (the true rank) must be <= min(M, H, N) = {min(M, H, N)}, the largest rank B A can have; got r={r} with M={M}, H={H}, N={N}")
    if N + r <= M + H and M + r <= N + H and H + r <= M + N:
        parity = (M + H + N + r) % 2
        return float(Fraction(2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2 + parity, 8))
    if M + H < N + r:
        return float(Fraction(H * M - H * r + N * r, 2))
    if N + H < M + r:
        return float(Fraction(H * N - H * r + M * r, 2))
    return float(Fraction(M * N, 2))


def dln_params(widths: Sequence[int]) -> int:
    """Number of parameters of a bias-free deep linear network: d = Σ_l H_l·H_(l+1).

    Args:
        widths: (H_1, ..., H_(L+1)), input width first, output width last, positive integers.
    """
    w = _widths("dln_params", widths)
    return sum(a * b for a, b in zip(w[:-1], w[1:], strict=True))


def dln(widths: Sequence[int], r: int) -> float:
    """Learning coefficient of a deep linear network x ↦ W_L ⋯ W_1 x at a true map of rank r.

    W_l is H_(l+1)×H_l; widths = (H_1, ..., H_(L+1)), input first. Let M_s = H_s − r. Take the
    set S of the ℓ + 1 smallest M_s (ℓ >= 1; ties are never split) such that

        max_{s∈S} M_s < min_{k∉S} M_k,   Σ_{s∈S} M_s >= ℓ·max_{s∈S} M_s,   Σ_{s∈S} M_s < ℓ·min_{k∉S} M_k

    (the conditions on the complement are void when S is everything). With Σ = Σ_{s∈S} M_s,
    m = ⌈Σ/ℓ⌉ and a = Σ − (m − 1)ℓ (so 1 <= a <= ℓ):

        λ = [r(H_1 + H_(L+1)) − r²]/2 + a(ℓ − a)/(4ℓ) − ℓ(ℓ − 1)/4·(Σ/ℓ)² + ½·Σ_{i<j in S} M_i M_j.

    Source: Aoyagi 2024, "Consideration on the learning efficiency of multiple-layered neural
    networks with linear units", Neural Networks 172:106132, Theorem 1; the same statement is
    implemented as `true_dln_learning_coefficient` in github.com/edmundlth/validating_lambdahat
    (Lau et al. 2025), whose argument order is (r, widths[1:], widths[0]). λ depends on the
    widths only through H_1 + H_(L+1) and the multiset {H_s}, so reversing widths leaves it
    unchanged; with L = 1 it is H_1·H_2/2 (regular); with L = 2 it equals `rrr(H_1, H_2, H_3, r)`.
    Condition: the prior is positive and smooth at the true parameter.

    Args:
        widths: (H_1, ..., H_(L+1)), input width first, output width last, positive integers, L >= 1.
        r: rank of the true product W_L ⋯ W_1, 0 <= r <= min(widths).
    """
    w = _widths("dln", widths)
    r = _int("dln", "r", r, minimum=0, meaning="the true rank")
    if r > min(w):
        raise ValueError(f"dln: r (the true rank) must be <= min(widths) = {min(w)}, the largest rank the product can have; got r={r} with widths={tuple(w)}")
    m = sorted(h - r for h in w)
    for size in range(2, len(m) + 1):
        S, rest, ell = m[:size], m[size:], size - 1
        total = sum(S)
        if rest and not S[-1] < rest[0]:
            continue
        if total < ell * S[-1]:
            continue
        if rest and not total < ell * rest[0]:
            continue
        break
    else:  # pragma: no cover - Theorem 1 guarantees S exists
        raise RuntimeError(f"dln: no index set S satisfies Aoyagi's conditions for widths={tuple(w)}, r={r}")
    ceil = -(-total // ell)
    a = total - (ceil - 1) * ell
    pairs = Fraction(total * total - sum(x * x for x in S), 2)  # Σ_{i<j in S} M_i M_j
    lam = Fraction(r * (w[0] + w[-1]) - r * r, 2) + Fraction(a * (ell - a), 4 * ell) - Fraction(ell * (ell - 1), 4) * Fraction(total, ell) ** 2 + pairs / 2
    return float(lam)


# ------------------------------------------------------------------------------------ code lengths


def dln_min_norm(M, L: int) -> float:
    """min Σ_l ‖W_l‖_F² subject to W_L ⋯ W_1 = M equals L·Σ_i σ_i(M)^(2/L).

    Lower bound: the Hölder inequality for Schatten quasi-norms (Bhatia 1997, Matrix Analysis,
    Ch. IV, from Horn's log-majorisation of singular values of products) gives
    ‖M‖_{S_(2/L)} <= Π_l ‖W_l‖_F, and AM-GM gives Π_l ‖W_l‖_F^(2/L) <= (1/L) Σ_l ‖W_l‖_F².
    Attained by the balanced factorisation W_l = U_l Σ^(1/L) U_(l-1)^T with U_0 = V, U_L = U
    from M = U Σ V^T. For L = 2 this is twice the nuclear norm (Srebro, Rennie & Jaakkola 2005);
    for general L see Shang, Liu & Cheng 2016 and Dai, Karzand & Srebro 2021 (representation
    cost of linear networks). Condition: every hidden width >= rank(M) (else no factorisation exists).

    Args:
        M: the target matrix (2-D) or its singular values (1-D, non-negative), finite.
        L: the number of factors, a positive integer.
    """
    L = _int("dln_min_norm", "L", L, minimum=1, meaning="the number of factors")
    a = np.asarray(M, dtype=float)
    if a.ndim == 2:
        s = np.linalg.svd(a, compute_uv=False)
    elif a.ndim == 1:
        s = a
    else:
        raise ValueError(f"dln_min_norm: M must be a 2-D matrix or a 1-D array of singular values, got an array of shape {a.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("dln_min_norm: M must be finite (no NaN or inf)")
    if np.any(s < 0):
        raise ValueError(f"dln_min_norm: singular values in M must be non-negative, got {s.tolist()}; pass the matrix itself or np.abs of its values")
    return float(L * np.sum(s ** (2 / L)))


def _counts(fn: str, n0, n1) -> tuple[int, int]:
    return (
        _int(fn, "n0", n0, minimum=0, meaning="the number of zeros"),
        _int(fn, "n1", n1, minimum=0, meaning="the number of ones"),
    )


def kt_code_bits(n0: int, n1: int) -> float:
    """Krichevsky–Trofimov code length, in bits, of a binary sequence with n0 zeros and n1 ones.

        −log₂ P_KT = −log₂[Γ(n0 + ½)·Γ(n1 + ½) / (π·Γ(n + 1))],   n = n0 + n1,

    the Bayes mixture of Bernoulli(θ) under the Jeffreys prior Beta(½, ½). It depends only on the
    counts (not the order) and equals Σ_t −log₂ of the sequential `kt_predict` probabilities.
    Asymptotically it is n·H(n1/n) + ½log₂ n + O(1) bits, and at most n·H(n1/n) + ½log₂ n + 1
    (Willems, Shtarkov & Tjalkens 1995). Computed with `scipy.special.gammaln`, stable for large n.

    Source: Krichevsky & Trofimov 1981, "The performance of universal encoding", IEEE Trans.
    Inform. Theory 27(2):199-207.

    Args:
        n0: number of zeros, an integer >= 0.
        n1: number of ones, an integer >= 0.
    """
    n0, n1 = _counts("kt_code_bits", n0, n1)
    nats = gammaln(n0 + n1 + 1) + math.log(math.pi) - gammaln(n0 + 0.5) - gammaln(n1 + 0.5)
    return float(nats / math.log(2))


def kt_predict(n0: int, n1: int) -> float:
    """Sequential Krichevsky–Trofimov predictor: P(next = 1 | n0 zeros, n1 ones so far) = (n1 + ½)/(n + 1).

    P(next = 0) is (n0 + ½)/(n + 1). Multiplying these along a sequence gives P_KT, so
    Σ_t −log₂ p_t = `kt_code_bits(n0, n1)` (Krichevsky & Trofimov 1981).

    Args:
        n0: zeros seen so far, an integer >= 0.
        n1: ones seen so far, an integer >= 0.
    """
    n0, n1 = _counts("kt_predict", n0, n1)
    return (n1 + 0.5) / (n0 + n1 + 1)
