"""Tests of the merge methods in ``mergesmith.methods``: oracles, identities, edges, properties, errors.

Every expected value is computed here in float64 from the formula in the method's docstring, by plain Python
loops over entries; mergesmith's own helpers are never the oracle (the one exception is the property test of
``top_magnitude_mask``, which tests that helper itself). Random data are float64 normals, so magnitudes
have no ties unless a test makes them.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.errors import MergeError
from mergesmith.methods import merge_tensors
from mergesmith.methods.sparsify import top_magnitude_mask

F64 = torch.float64
SHAPES = [(4, 6), (7,), (1,)]
RANDOM_METHODS = {"dare_linear", "dare_ties"}
SPARSE_METHODS = ["ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]
TASK_VECTOR_METHODS = ["task_arithmetic", *SPARSE_METHODS]
EXACT = {"rtol": 1e-12, "atol": 1e-12}


# ---------------------------------------------------------------------- data


def randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def make_models(shape: tuple[int, ...], n: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base θ_0 and n fine-tunes θ_i = θ_0 + τ_i, all random float64."""
    base = randn(shape, seed)
    return base, [base + randn(shape, seed + 1 + i) for i in range(n)]


def merge(method: str, base, tensors, *, seed: int = 0, **kwargs) -> torch.Tensor:
    """merge_tensors with a seeded generator for the random methods."""
    generator = torch.Generator().manual_seed(seed) if method in RANDOM_METHODS else None
    return merge_tensors(method, base, tensors, generator=generator, **kwargs)


def flat(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.reshape(-1).tolist()]


def as_tensor(values: list[float], shape) -> torch.Tensor:
    return torch.tensor(values, dtype=F64).reshape(shape)


def per_model(**columns: list) -> list[dict]:
    """model_parameters from columns: per_model(weight=[1, 2]) -> [{"weight": 1}, {"weight": 2}]."""
    n = len(next(iter(columns.values())))
    return [{name: values[i] for name, values in columns.items()} for i in range(n)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, **EXACT)


# ---------------------------------------------------------------------- oracles


def task_vectors(base: torch.Tensor, tensors: list[torch.Tensor]) -> tuple[list[float], list[list[float]]]:
    """τ_i = θ_i − θ_0, entry by entry."""
    b = flat(base)
    return b, [[x - y for x, y in zip(flat(t), b, strict=True)] for t in tensors]


def trim_count(density: float, n: int) -> int:
    """TIES trim size k = max(1, ⌊density·n⌋); none at density 0, all at density 1."""
    if density <= 0:
        return 0
    if density >= 1:
        return n
    return max(1, math.floor(density * n))


def top_k(values: list[float], k: int) -> set[int]:
    """Indices of the k largest |values|; equal magnitudes go to the lower index first."""
    return set(sorted(range(len(values)), key=lambda j: (-abs(values[j]), j))[:k])


def breadcrumbs_keep(values: list[float], density: float, gamma: float) -> set[int]:
    """Model Breadcrumbs: kept = ⌊density·n⌋, outliers = ⌊γn⌋ reduced to n − kept when they do not fit;
    drop the `outliers` largest |values| and the smallest ones, i.e. keep the ascending ranks
    [n − outliers − kept, n − outliers)."""
    n = len(values)
    kept = n if density >= 1 else math.floor(density * n)
    outliers = min(math.floor(gamma * n), n - kept)
    ascending = sorted(range(n), key=lambda j: abs(values[j]))
    return set(ascending[n - outliers - kept:n - outliers])


def masked(values: list[float], keep: set[int], rescale: str = "none", density: float = 1.0) -> list[float]:
    """τ̂ = τ on `keep`, 0 elsewhere; then ×1/density ("inverse_density") or ×‖τ‖₁/‖τ̂‖₁ ("l1")."""
    out = [v if j in keep else 0.0 for j, v in enumerate(values)]
    if rescale == "inverse_density" and density > 0:
        out = [v / density for v in out]
    elif rescale == "l1":
        before, after = sum(abs(v) for v in values), sum(abs(v) for v in out)
        if after > 0:
            out = [v * before / after for v in out]
    return out


def combine(base: list[float], sparse: list[list[float]], weights: list[float], *, scale: float = 1.0,
            normalize: bool = False, elect_sign: bool = False) -> list[float]:
    """θ = θ_0 + λ·C, entry by entry, from sparsified task vectors τ̂_i.

    Plain: C = Σ_i w_i τ̂_i, divided by Σ_i w_i when normalizing (a zero sum divides by 1).
    TIES: elect s = sign(Σ_i w_i τ̂_i) (+ when ≥ 0); A = the models whose w_i τ̂_i is nonzero with sign s;
    C = Σ_{i∈A} w_i τ̂_i, divided when normalizing by Σ_{i∈A} w_i (by 1 when A is empty).
    """
    out = []
    for j, b in enumerate(base):
        terms = [w * tau[j] for w, tau in zip(weights, sparse, strict=True)]
        if elect_sign:
            sign = 1.0 if sum(terms) >= 0 else -1.0
            agree = [i for i, x in enumerate(terms) if x != 0 and math.copysign(1.0, x) == sign]
            total = sum(terms[i] for i in agree)
            divisor = sum(weights[i] for i in agree) or 1.0
        else:
            total = sum(terms)
            divisor = sum(weights) or 1.0
        out.append(b + scale * (total / divisor if normalize else total))
    return out


def linear_oracle(tensors, weights, normalize: bool) -> torch.Tensor:
    """Σ_i w_i θ_i / Σ_i w_i (without normalize: Σ_i w_i θ_i)."""
    values = [flat(t) for t in tensors]
    out = []
    for j in range(len(values[0])):
        total = sum(w * v[j] for w, v in zip(weights, values, strict=True))
        out.append(total / sum(weights) if normalize else total)
    return as_tensor(out, tensors[0].shape)


def task_arithmetic_oracle(base, tensors, weights, *, scale=1.0, normalize=False) -> torch.Tensor:
    """θ_0 + λ Σ_i w_i τ_i (divided by Σ_i w_i when normalizing)."""
    b, taus = task_vectors(base, tensors)
    return as_tensor(combine(b, taus, weights, scale=scale, normalize=normalize), base.shape)


def ties_oracle(base, tensors, weights, densities, *, scale=1.0, normalize=True, rescale="none"):
    """TIES: trim each τ_i to its top max(1, ⌊density_i·n⌋) magnitudes, then the TIES combine."""
    b, taus = task_vectors(base, tensors)
    trimmed = [masked(tau, top_k(tau, trim_count(d, len(tau))), rescale, d)
               for tau, d in zip(taus, densities, strict=True)]
    merged = combine(b, trimmed, weights, scale=scale, normalize=normalize, elect_sign=True)
    return as_tensor(merged, base.shape)


def breadcrumbs_oracle(base, tensors, weights, densities, gammas, *, scale=1.0, normalize=False,
                       elect_sign=False, rescale="none") -> torch.Tensor:
    """Breadcrumbs trim of each τ_i (breadcrumbs_keep), then the plain or the TIES combine."""
    b, taus = task_vectors(base, tensors)
    crumbs = [masked(tau, breadcrumbs_keep(tau, d, g), rescale, d)
              for tau, d, g in zip(taus, densities, gammas, strict=True)]
    return as_tensor(combine(b, crumbs, weights, scale=scale, normalize=normalize, elect_sign=elect_sign),
                     base.shape)


def norm(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def slerp_oracle(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Shoemake: cos θ = v̂0·v̂1 over the flattened tensors; sin((1−t)θ)/sin θ·v0 + sin(tθ)/sin θ·v1, or
    (1−t)v0 + t v1 when |cos θ| > 0.9995. Norms ≤ 1e-8 count as 1."""
    a, b = flat(v0), flat(v1)
    na, nb = (n if n > 1e-8 else 1.0 for n in (norm(a), norm(b)))
    cos = sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)
    cos = min(1.0, max(-1.0, cos))
    if abs(cos) > 0.9995:
        return as_tensor([(1 - t) * x + t * y for x, y in zip(a, b, strict=True)], v0.shape)
    theta = math.acos(cos)
    c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return as_tensor([c0 * x + c1 * y for x, y in zip(a, b, strict=True)], v0.shape)


def nuslerp_vector(t: float, a: list[float], b: list[float]) -> list[float]:
    """SLERP of one vector pair, norms clamped at 1e-7; linear when 1 − cos²θ ≤ (1e-8)² (colinear)."""
    cos = sum(x * y for x, y in zip(a, b, strict=True)) / (max(norm(a), 1e-7) * max(norm(b), 1e-7))
    cos = min(1.0, max(-1.0, cos))
    if 1 - cos * cos <= 1e-16:
        return [(1 - t) * x + t * y for x, y in zip(a, b, strict=True)]
    theta = math.acos(cos)
    c0, c1 = math.sin((1 - t) * theta), math.sin(t * theta)
    return [(c0 * x + c1 * y) / math.sin(theta) for x, y in zip(a, b, strict=True)]


def vector_groups(shape, *, row_wise: bool, flatten: bool) -> list[list[int]]:
    """Flat indices of each interpolated vector: the whole tensor, each row, or (row_wise) each column."""
    if flatten or len(shape) == 1:
        return [list(range(math.prod(shape)))]
    rows, cols = shape
    if row_wise:
        return [[i * cols + j for i in range(rows)] for j in range(cols)]
    return [[i * cols + j for j in range(cols)] for i in range(rows)]


def nuslerp_oracle(t, v0, v1, *, row_wise: bool, flatten: bool, base=None) -> torch.Tensor:
    """NuSLERP of v0 → v1 per vector group; with a base, of the task vectors, plus the base."""
    if base is not None:
        return base + nuslerp_oracle(t, v0 - base, v1 - base, row_wise=row_wise, flatten=flatten)
    a, b = flat(v0), flat(v1)
    out = [0.0] * len(a)
    for group in vector_groups(v0.shape, row_wise=row_wise, flatten=flatten):
        merged = nuslerp_vector(t, [a[j] for j in group], [b[j] for j in group])
        for j, value in zip(group, merged, strict=True):
            out[j] = value
    return as_tensor(out, v0.shape)


def model_stock_oracle(base, tensors, *, filter_wise: bool) -> torch.Tensor:
    """Model Stock per group (each row when filter_wise, else the whole tensor): cos = mean pairwise cosine of
    the τ_i (norm products clamped at 1e-6), t = N cos / (1 + (N−1) cos) (0 when |denominator| < 1e-6),
    θ = t·mean_i θ_i + (1 − t)·θ_0."""
    b, taus = task_vectors(base, tensors)
    models = [flat(t) for t in tensors]
    n = len(tensors)
    out = [0.0] * len(b)
    for group in vector_groups(base.shape, row_wise=False, flatten=not filter_wise):
        offsets = [[tau[j] for j in group] for tau in taus]
        cosines = []
        for i in range(n):
            for k in range(i + 1, n):
                dot = sum(x * y for x, y in zip(offsets[i], offsets[k], strict=True))
                cosines.append(min(1.0, max(-1.0, dot / max(norm(offsets[i]) * norm(offsets[k]), 1e-6))))
        cos = sum(cosines) / len(cosines)
        denominator = 1 + (n - 1) * cos
        t = 0.0 if abs(denominator) < 1e-6 else n * cos / denominator
        for j in group:
            out[j] = t * sum(m[j] for m in models) / n + (1 - t) * b[j]
    return as_tensor(out, base.shape)


# ---------------------------------------------------------------------- oracle tests


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_is_the_weighted_mean(shape, normalize):
    base, tensors = make_models(shape, 3)
    weights = [0.5, 1.5, 2.25]
    params = {"normalize": normalize, "model_parameters": per_model(weight=weights)}
    got = merge("linear", base, tensors, **params)
    assert_close(got, linear_oracle(tensors, weights, normalize))
    assert_close(merge("linear", None, tensors, **params), got)  # the base is ignored


def test_per_model_value_overrides_the_global_default():
    _, tensors = make_models((7,), 3)
    got = merge("linear", None, tensors, weight=2.0, model_parameters=[{"weight": 0.5}, {}, {}])
    assert_close(got, linear_oracle(tensors, [0.5, 2.0, 2.0], normalize=True))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_task_arithmetic(shape, normalize, lam):
    base, tensors = make_models(shape, 3)
    weights = [0.5, 1.5, 2.25]
    got = merge("task_arithmetic", base, tensors, normalize=normalize, **{"lambda": lam},
                model_parameters=per_model(weight=weights))
    assert_close(got, task_arithmetic_oracle(base, tensors, weights, scale=lam, normalize=normalize))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rescale", ["none", "l1"])
def test_ties(shape, normalize, rescale):
    base, tensors = make_models(shape, 3, seed=10)
    weights, densities = [0.7, 1.3, 1.0], [0.3, 0.6, 0.5]
    got = merge("ties", base, tensors, normalize=normalize, rescale=rescale, **{"lambda": 0.8},
                model_parameters=per_model(weight=weights, density=densities))
    expected = ties_oracle(base, tensors, weights, densities, scale=0.8, normalize=normalize, rescale=rescale)
    assert_close(got, expected)


def test_ties_by_hand():
    """Density 0.5 on 4 entries keeps 2 per model; signs are elected from the trimmed sums."""
    base = torch.zeros(4, dtype=F64)
    t1 = torch.tensor([3.0, -1.0, 0.5, -2.0], dtype=F64)  # keeps 3, -2
    t2 = torch.tensor([-1.0, 4.0, 0.25, -5.0], dtype=F64)  # keeps 4, -5
    # weights 1, 2: entry 0: 3 (+), entry 1: 8 (+), entry 2: nothing, entry 3: -2 - 10 (-), both agree
    expected = torch.tensor([3.0 / 1, 8.0 / 2, 0.0, -12.0 / 3], dtype=F64)
    got = merge("ties", base, [t1, t2], density=0.5, model_parameters=per_model(weight=[1.0, 2.0]))
    assert_close(got, expected)


def test_ties_elects_plus_when_the_weighted_sum_is_zero():
    """w·τ = 1·2 and 2·(−1) cancel: + is elected, only model 1 agrees, divided by its weight 1."""
    base = torch.zeros(1, dtype=F64)
    got = merge("ties", base, [torch.tensor([2.0], dtype=F64), torch.tensor([-1.0], dtype=F64)],
                model_parameters=per_model(weight=[1.0, 2.0]))
    assert_close(got, torch.tensor([2.0], dtype=F64))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("rescale", [False, "l1"])
@pytest.mark.parametrize("densities, gammas", [
    ([0.5, 0.3, 0.6], [0.1, 0.2, 0.01]),
    ([0.8, 0.9, 0.7], [0.3, 0.25, 0.5]),  # outliers + kept > n: fewer outliers are dropped
])
def test_breadcrumbs(shape, method, rescale, densities, gammas):
    base, tensors = make_models(shape, 3, seed=20)
    weights = [0.7, 1.3, 1.0]
    got = merge(method, base, tensors, normalize=True, rescale=rescale, **{"lambda": 0.9},
                model_parameters=per_model(weight=weights, density=densities, gamma=gammas))
    expected = breadcrumbs_oracle(base, tensors, weights, densities, gammas, scale=0.9, normalize=True,
                                  elect_sign=method == "breadcrumbs_ties", rescale=rescale or "none")
    assert_close(got, expected)


@pytest.mark.parametrize("density, gamma, kept_magnitudes", [
    (0.5, 0.2, [4, 5, 6, 7, 8]),  # drop the 2 largest (9, 10) and the 3 smallest
    (0.8, 0.3, [1, 2, 3, 4, 5, 6, 7, 8]),  # 8 kept leave room for 2 outliers, not 3
    (0.5, 0.01, [6, 7, 8, 9, 10]),  # fewer than 1/γ elements: no outliers, the top 5 (mergekit gave zeros)
])
def test_breadcrumbs_by_hand(density, gamma, kept_magnitudes):
    signs = [1, -1, -1, 1, 1, -1, 1, -1, -1, 1]
    order = [7, 2, 9, 4, 1, 10, 3, 6, 8, 5]  # magnitudes, shuffled
    tau = torch.tensor([s * m for s, m in zip(signs, order, strict=True)], dtype=F64)
    got = merge("breadcrumbs", torch.zeros(10, dtype=F64), [tau], density=density, gamma=gamma)
    expected = torch.where(torch.isin(tau.abs(), torch.tensor(kept_magnitudes, dtype=F64)), tau, 0.0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shape", [(4, 6), (7,)])
@pytest.mark.parametrize("t", [0.3, 0.75])
def test_slerp(shape, t):
    base, (other,) = make_models(shape, 1, seed=30)
    assert_close(merge("slerp", base, [other], t=t), slerp_oracle(t, base, other))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("row_wise", [False, True])
@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(shape, row_wise, flatten, with_base):
    base, (v0, v1) = make_models(shape, 2, seed=40)
    got = merge("nuslerp", base if with_base else None, [v0, v1], nuslerp_row_wise=row_wise,
                nuslerp_flatten=flatten, model_parameters=per_model(weight=[1.0, 3.0]))
    expected = nuslerp_oracle(0.75, v0, v1, row_wise=row_wise, flatten=flatten,
                              base=base if with_base else None)
    assert_close(got, expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n_models", [2, 3])
def test_model_stock(shape, filter_wise, n_models):
    base = randn(shape, 50)
    # correlated task vectors, so that cos θ is far from 0
    common = randn(shape, 51)
    tensors = [base + common + 0.8 * randn(shape, 52 + i) for i in range(n_models)]
    got = merge("model_stock", base, tensors, filter_wise=filter_wise)
    assert_close(got, model_stock_oracle(base, tensors, filter_wise=filter_wise))


@pytest.mark.parametrize("scale", [1.0, 0.5, -2.0])
def test_passthrough(scale):
    _, (tensor,) = make_models((4, 6), 1)
    got = merge("passthrough", None, [tensor], scale=scale)
    assert_close(got, as_tensor([scale * x for x in flat(tensor)], tensor.shape))


# ---------------------------------------------------------------------- DARE


def dare_masks(method: str, shape, densities: list[float], seed: int) -> list[torch.Tensor]:
    """The keep-masks that ``seed`` draws for each model. DARE's masks do not depend on the values, so a merge
    of probe task vectors 1, 2, 4, … (base 0, weight 1, no rescale) has entries Σ_i 2^i m_i: read the bits."""
    probes = [torch.full(shape, float(2**i), dtype=F64) for i in range(len(densities))]
    code = merge(method, torch.zeros(shape, dtype=F64), probes, seed=seed, rescale="none",
                 model_parameters=per_model(density=densities)).round().long()
    return [(code >> i) & 1 == 1 for i in range(len(densities))]


@pytest.mark.parametrize("method", sorted(RANDOM_METHODS))
def test_dare_is_reproducible_with_a_seed(method):
    base, tensors = make_models((4, 6), 2)
    first = merge(method, base, tensors, density=0.5, seed=7)
    assert torch.equal(first, merge(method, base, tensors, density=0.5, seed=7))
    assert not torch.equal(first, merge(method, base, tensors, density=0.5, seed=8))


@pytest.mark.parametrize("method", sorted(RANDOM_METHODS))
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_single_model_keeps_tau_over_density(method, density):
    tau = randn((4, 6), 60)
    got = merge(method, torch.zeros_like(tau), [tau], density=density, seed=3)
    kept = got != 0
    assert 0 < int(kept.sum()) < tau.numel()
    assert torch.equal(got[kept], tau[kept] / density)


@pytest.mark.parametrize("method", sorted(RANDOM_METHODS))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(4, 6), (7,)])
def test_dare_matches_the_formula_for_its_masks(method, normalize, shape):
    """θ_0 + λ·combine(w_i · m_i τ_i / p_i) with the masks m_i the same seed draws."""
    base, tensors = make_models(shape, 3, seed=70)
    weights, densities = [0.7, 1.3, 1.0], [0.4, 0.7, 0.5]
    masks = dare_masks(method, shape, densities, seed=5)
    got = merge(method, base, tensors, seed=5, normalize=normalize, **{"lambda": 0.9},
                model_parameters=per_model(weight=weights, density=densities))
    b, taus = task_vectors(base, tensors)
    dropped = [masked(tau, set(torch.nonzero(m.reshape(-1)).reshape(-1).tolist()), "inverse_density", p)
               for tau, m, p in zip(taus, masks, densities, strict=True)]
    expected = combine(b, dropped, weights, scale=0.9, normalize=normalize, elect_sign=method == "dare_ties")
    assert_close(got, as_tensor(expected, shape))


@pytest.mark.parametrize("shape", SHAPES)
def test_dare_density_one_is_task_arithmetic_or_ties(shape):
    base, tensors = make_models(shape, 3)
    weights = [0.5, 1.5, 1.0]
    params = {"density": 1.0, "normalize": True, "model_parameters": per_model(weight=weights), "lambda": 0.6}
    assert_close(merge("dare_linear", base, tensors, **params),
                 task_arithmetic_oracle(base, tensors, weights, scale=0.6, normalize=True))
    assert_close(merge("dare_ties", base, tensors, **params),
                 ties_oracle(base, tensors, weights, [1.0] * 3, scale=0.6, normalize=True))


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keeps_a_density_fraction(density):
    tau = randn((100_000,), 80) + 10.0  # no zero entries
    got = merge("dare_linear", torch.zeros_like(tau), [tau], density=density, seed=11)
    assert abs(float((got != 0).double().mean()) - density) < 0.01


def test_dare_rescale_l1_matches_the_l1_norm():
    tau = randn((50,), 90)
    got = merge("dare_linear", torch.zeros_like(tau), [tau], density=0.4, rescale="l1", seed=2)
    kept = got != 0
    ratio = got[kept] / tau[kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), **EXACT)  # one common factor
    torch.testing.assert_close(got.abs().sum(), tau.abs().sum(), **EXACT)


@pytest.mark.parametrize("rescale", [False, "none"])
def test_dare_without_rescale_keeps_tau(rescale):
    tau = randn((50,), 91)
    got = merge("dare_linear", torch.zeros_like(tau), [tau], density=0.4, rescale=rescale, seed=2)
    kept = got != 0
    assert 0 < int(kept.sum()) < tau.numel()
    assert torch.equal(got[kept], tau[kept])


def test_rescale_true_means_inverse_density_for_dare_and_l1_for_ties():
    base, tensors = make_models((4, 6), 2)
    for method, meaning in [("dare_linear", "inverse_density"), ("dare_ties", "inverse_density"),
                            ("ties", "l1"), ("breadcrumbs", "l1")]:
        assert torch.equal(merge(method, base, tensors, density=0.5, rescale=True),
                           merge(method, base, tensors, density=0.5, rescale=meaning)), method


# ---------------------------------------------------------------------- identities


IDENTICAL_CASES = [
    ("linear", {"model_parameters": per_model(weight=[0.5, 2.0, 1.0])}),
    ("task_arithmetic", {"normalize": True, "model_parameters": per_model(weight=[0.5, 2.0, 1.0])}),
    ("ties", {"density": 1.0, "model_parameters": per_model(weight=[0.5, 2.0, 1.0])}),
    ("dare_linear", {"density": 1.0, "normalize": True}),
    ("dare_ties", {"density": 1.0, "normalize": True}),
    ("breadcrumbs", {"density": 1.0, "normalize": True}),
    ("breadcrumbs_ties", {"density": 1.0, "normalize": True}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
]


@pytest.mark.parametrize("method, params", IDENTICAL_CASES, ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("shape", SHAPES)
def test_identical_models_merge_to_that_model(method, params, shape):
    base, (model,) = make_models(shape, 1)
    assert_close(merge(method, base, [model.clone() for _ in range(3)], **params), model)


@pytest.mark.parametrize("shape", SHAPES)
def test_identical_models_for_the_two_and_one_model_methods(shape):
    base, (model,) = make_models(shape, 1)
    for with_base in (None, base):
        got = merge("nuslerp", with_base, [model, model.clone()], model_parameters=per_model(weight=[1, 3]))
        assert_close(got, model)
    assert_close(merge("slerp", model, [model.clone()], t=0.3), model)
    assert_close(merge("passthrough", None, [model]), model)
    assert_close(merge("linear", None, [model], weight=1.0, normalize=False), model)


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_ties_density_one_with_agreeing_signs_is_the_weighted_mean(lam):
    base = randn((4, 6), 100)
    sign = torch.where(randn((4, 6), 101) >= 0, 1.0, -1.0).to(F64)
    taus = [sign * (randn((4, 6), 102 + i).abs() + 0.1) for i in range(3)]
    weights = [0.5, 2.0, 1.0]
    got = merge("ties", base, [base + tau for tau in taus], density=1.0, **{"lambda": lam},
                model_parameters=per_model(weight=weights))
    expected = base + lam * sum(w * tau for w, tau in zip(weights, taus, strict=True)) / sum(weights)
    assert_close(got, expected)


@pytest.mark.parametrize("shape", [(4, 6), (7,)])
def test_slerp_endpoints(shape):
    base, (other,) = make_models(shape, 1)
    assert_close(merge("slerp", base, [other], t=0.0), base)
    assert_close(merge("slerp", base, [other], t=1.0), other)


@pytest.mark.parametrize("t", [0.5, 1 / 3])
def test_slerp_on_orthonormal_vectors(t):
    """For orthonormal v0, v1 (θ = π/2) SLERP is cos(tπ/2)·v0 + sin(tπ/2)·v1: at t = 1/2, (v0 + v1)/√2."""
    q, _ = torch.linalg.qr(randn((8, 2), 110))
    v0, v1 = q[:, 0].reshape(2, 4), q[:, 1].reshape(2, 4)
    expected = math.cos(t * math.pi / 2) * v0 + math.sin(t * math.pi / 2) * v1
    got = merge("slerp", v0, [v1], t=t)
    assert_close(got, expected)
    torch.testing.assert_close(torch.linalg.vector_norm(got), torch.tensor(1.0, dtype=F64), **EXACT)


@pytest.mark.parametrize("cos, linear", [(0.9997, True), (0.9990, False)])
def test_slerp_falls_back_to_linear_for_nearly_colinear_tensors(cos, linear):
    v0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    v1 = 2.0 * torch.tensor([cos, math.sqrt(1 - cos**2), 0.0], dtype=F64)
    got = merge("slerp", v0, [v1], t=0.4)
    lerp = 0.6 * v0 + 0.4 * v1
    theta = math.acos(cos)
    spherical = (math.sin(0.6 * theta) * v0 + math.sin(0.4 * theta) * v1) / math.sin(theta)
    assert not torch.allclose(lerp, spherical, rtol=0, atol=1e-9)  # the two formulas are distinguishable
    assert_close(got, lerp if linear else spherical)


def test_model_stock_with_orthogonal_task_vectors_of_equal_norm_is_the_base():
    base = randn((4, 6), 120)
    q, _ = torch.linalg.qr(randn((24, 2), 121))
    tensors = [base + 3.0 * q[:, i].reshape(4, 6) for i in range(2)]
    assert_close(merge("model_stock", base, tensors), base)


@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_with_parallel_rows_interpolates_linearly(with_base):
    base = randn((4, 6), 130) if with_base else torch.zeros(4, 6, dtype=F64)
    rows = randn((4, 6), 131)
    factors = torch.tensor([[2.0], [0.5], [1.0], [3.0]], dtype=F64)
    v0, v1 = base + rows, base + factors * rows
    got = merge("nuslerp", base if with_base else None, [v0, v1], nuslerp_flatten=False,
                model_parameters=per_model(weight=[3.0, 1.0]))
    assert_close(got, 0.75 * v0 + 0.25 * v1)


# ---------------------------------------------------------------------- edge cases


ALL_CASES = [
    ("linear", {}),
    ("task_arithmetic", {"normalize": True}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "rescale": "l1"}),
    ("dare_linear", {"density": 0.3}),
    ("dare_linear", {"density": 0.3, "rescale": "l1"}),
    ("dare_ties", {"density": 0.3}),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.1}),
    ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.1, "rescale": "l1"}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("nuslerp", {}),
    ("nuslerp", {"nuslerp_flatten": False}),
]


@pytest.mark.parametrize("method, params", ALL_CASES, ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("shape", SHAPES)
def test_zero_task_vectors_give_the_base(method, params, shape):
    base = randn(shape, 140)
    got = merge(method, base, [base.clone(), base.clone()], **params)
    assert_close(got, base)


# methods whose ``normalize`` divides by the total Σ w_i; the TIES-style ones divide each entry by the summed
# weights of the models that agree with its sign, which is zero only where nothing is kept
TOTAL_NORMALIZING = ["task_arithmetic", "dare_linear", "breadcrumbs"]
CURVATURE = ["fisher", "regmean", "mats", "gradient_matching"]


@pytest.mark.parametrize("method", TASK_VECTOR_METHODS)
@pytest.mark.parametrize("normalize", [True, False])
def test_zero_weights_give_the_base(method, normalize):
    base, tensors = make_models((4, 6), 3)
    if normalize and method in TOTAL_NORMALIZING:  # 0/0: refused, where it once fell back to dividing by 1
        with pytest.raises(MergeError, match="weights sum to zero"):
            merge(method, base, tensors, weight=0.0, normalize=normalize)
        return
    got = merge(method, base, tensors, weight=0.0, normalize=normalize)
    assert_close(got, base)


@pytest.mark.parametrize("method", ["linear", *TOTAL_NORMALIZING, *CURVATURE])
def test_weights_summing_to_zero_are_refused_before_any_tensor(method):
    """A division by Σ w_i = 0: refused by the method's validate hook, not by the arithmetic. The curvature
    methods' weights are >= 0, so only (0, 0) sums to zero there."""
    base, tensors = make_models((4, 6), 2)
    params = {"normalize": True} if method in TOTAL_NORMALIZING else {}
    weights, shown = ((0.0, 0.0), "0, 0") if method in CURVATURE else ((1.0, -1.0), "1, -1")
    with pytest.raises(MergeError, match=rf"weights sum to zero \({shown}\)"):
        merge(method, base, tensors, model_parameters=[{"weight": w} for w in weights], **params)


@pytest.mark.parametrize("method", SPARSE_METHODS)
@pytest.mark.parametrize("rescale", [True, False, "inverse_density", "l1", "none"])
def test_density_zero_gives_the_base(method, rescale):
    base, tensors = make_models((4, 6), 2)
    assert_close(merge(method, base, tensors, density=0.0, rescale=rescale), base)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_density_one_keeps_everything(method):
    base, tensors = make_models((4, 6), 3)
    gamma = {"gamma": 0.2} if method.startswith("breadcrumbs") else {}
    got = merge(method, base, tensors, density=1.0, normalize=True, **gamma)
    if method == "breadcrumbs":
        expected = task_arithmetic_oracle(base, tensors, [1.0] * 3, normalize=True)
    else:
        expected = ties_oracle(base, tensors, [1.0] * 3, [1.0] * 3)
    assert_close(got, expected)


def test_one_element_tensors():
    base, tau = torch.tensor([0.5], dtype=F64), torch.tensor([-2.0], dtype=F64)
    # TIES keeps at least one entry; Breadcrumbs keeps ⌊0.5·1⌋ = 0 of them
    assert_close(merge("ties", base, [base + tau], density=0.5), base + tau)
    assert_close(merge("breadcrumbs", base, [base + tau], density=0.5), base)
    assert_close(merge("dare_linear", base, [base + tau], density=1.0), base + tau)
    # one entry is colinear with anything: SLERP and NuSLERP interpolate linearly
    assert_close(merge("slerp", base, [base + tau], t=0.25), base + 0.25 * tau)
    assert_close(merge("nuslerp", None, [base, base + tau]), base + 0.5 * tau)
    # opposite task vectors: cos = −1, 1 + (N−1)cos = 0, Model Stock keeps the base
    assert_close(merge("model_stock", base, [base + tau, base - tau]), base)


# ---------------------------------------------------------------------- properties


PERMUTABLE = [
    ("linear", {}),
    ("task_arithmetic", {"normalize": True, "lambda": 0.7}),
    ("ties", {"density": 0.4}),
    ("model_stock", {}),
]


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(PERMUTABLE), n=st.integers(2, 4), shape=st.sampled_from(SHAPES),
       seed=st.integers(0, 10_000), data=st.data())
def test_model_order_does_not_matter(case, n, shape, seed, data):
    method, params = case
    order = data.draw(st.permutations(range(n)))
    weights = data.draw(st.lists(st.floats(0.1, 3.0), min_size=n, max_size=n))
    base, tensors = make_models(shape, n, seed)
    rows = [{} if method == "model_stock" else {"weight": w} for w in weights]
    got = merge(method, base, tensors, model_parameters=rows, **params)
    permuted = merge(method, base, [tensors[i] for i in order], model_parameters=[rows[i] for i in order],
                     **params)
    torch.testing.assert_close(got, permuted, rtol=1e-10, atol=1e-10)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), density=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_magnitude_trim_keeps_exactly_k_of_a_random_tensor(n, density, seed):
    delta = randn((n,), seed)
    mask = top_magnitude_mask(delta, density)
    k = trim_count(density, n)
    assert int(mask.sum()) == k
    assert set(torch.nonzero(mask).reshape(-1).tolist()) == top_k(flat(delta), k)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(-3, 3), min_size=1, max_size=200), density=st.floats(0.0, 1.0))
def test_magnitude_trim_keeps_exactly_k_with_tied_magnitudes(values, density):
    """Integer entries tie often; the trim still keeps k entries, the largest, ties going to lower indices."""
    delta = torch.tensor(values, dtype=F64).reshape(-1)
    mask = top_magnitude_mask(delta, density)
    k = trim_count(density, len(values))
    assert int(mask.sum()) == k
    assert set(torch.nonzero(mask).reshape(-1).tolist()) == top_k([float(v) for v in values], k)


LARGE = 300_001  # above 4·2^16 entries top_magnitude_mask brackets the threshold from a sample first


@pytest.mark.parametrize("data", ["normal", "integers", "mostly_zero"])
@pytest.mark.parametrize("density", [1e-7, 0.3, 0.9999999])
def test_magnitude_trim_keeps_exactly_k_of_a_large_tensor(data, density):
    """The sampled fast path (and its fallback when the sample misses) keeps the same k entries as a full
    stable sort by descending magnitude, ties going to lower indices."""
    g = torch.Generator().manual_seed(3)
    delta = {
        "normal": lambda: torch.randn(LARGE, generator=g, dtype=F64),
        "integers": lambda: torch.randint(-3, 4, (LARGE,), generator=g).to(F64),
        "mostly_zero": lambda: torch.where(torch.rand(LARGE, generator=g) < 0.995, 0.0,
                                           torch.randn(LARGE, generator=g, dtype=F64)),
    }[data]()
    mask = top_magnitude_mask(delta, density)
    k = trim_count(density, LARGE)
    expected = torch.zeros(LARGE, dtype=torch.bool)
    expected[torch.sort(-delta.abs(), stable=True).indices[:k]] = True
    assert int(mask.sum()) == k
    assert torch.equal(mask, expected)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 300), density=st.floats(0.0, 1.0), gamma=st.floats(0.0, 1.0),
       seed=st.integers(0, 10_000))
def test_breadcrumbs_keeps_floor_density_n_entries(n, density, gamma, seed):
    tau = randn((n,), seed) + 5.0  # no zero entries
    got = merge("breadcrumbs", torch.zeros_like(tau), [tau], density=density, gamma=gamma)
    keep = breadcrumbs_keep(flat(tau), density, gamma)
    assert int((got != 0).sum()) == len(keep) == (n if density >= 1 else math.floor(density * n))
    assert set(torch.nonzero(got).reshape(-1).tolist()) == keep


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from([*TASK_VECTOR_METHODS, "model_stock", "nuslerp"]),
       shape=st.sampled_from(SHAPES), density=st.floats(0.0, 1.0), gamma=st.floats(0.0, 1.0),
       weight=st.sampled_from([0.0, 0.5, 1.0]), normalize=st.booleans(), seed=st.integers(0, 10_000))
def test_no_nan_for_zero_task_vectors(method, shape, density, gamma, weight, normalize, seed):
    base = randn(shape, seed)
    params = {
        "model_stock": {},
        "nuslerp": {"weight": weight},
        "task_arithmetic": {"weight": weight, "normalize": normalize},
    }.get(method, {"weight": weight, "normalize": normalize, "density": density})
    if method.startswith("breadcrumbs"):
        params["gamma"] = gamma
    if weight == 0 and normalize and method in TOTAL_NORMALIZING:
        return  # refused as 0/0: test_zero_weights_give_the_base
    got = merge(method, base, [base.clone(), base.clone()], **params)
    assert_close(got, base)


# ---------------------------------------------------------------------- errors


def _models():
    return make_models((4, 6), 2)


@pytest.mark.parametrize("method, kwargs, message", [
    ("tie", {}, r"unknown merge_method 'tie' \(did you mean 'ties'\?\)"),
    ("ties", {"densty": 0.5}, r"unknown parameter 'densty' for method 'ties' \(did you mean 'density'\?\)"),
    ("ties", {"model_parameters": [{"lambda": 1.0}, {}]}, r"'lambda' is a global parameter of 'ties'"),
    ("ties", {"density": 1.5}, r"'density' must lie in \[0\.0, 1\.0\], got 1\.5"),
    ("ties", {"density": -0.1}, r"'density' must lie in \[0\.0, 1\.0\], got -0\.1"),
    ("ties", {"model_parameters": [{"density": 2.0}, {}]}, r"'density' must lie in \[0\.0, 1\.0\], got 2\.0"),
    ("ties", {"density": "0.5"}, r"'density' must be a number, got '0\.5'"),
    ("ties", {"density": True}, r"'density' must be a number, got True"),
    ("ties", {"normalize": "yes"}, r"'normalize' must be true or false, got 'yes'"),
    ("ties", {"rescale": "l2"}, r"'rescale' must be one of .*'l1'.*got 'l2'"),
    ("linear", {"model_parameters": per_model(weight=[1.0, -1.0])}, r"weights sum to zero"),
    ("model_stock", {"model_parameters": [{}]}, r"at least 2 model\(s\)"),
])
def test_invalid_input_raises(method, kwargs, message):
    base, tensors = _models()
    if method == "model_stock":
        tensors = tensors[:1]
    with pytest.raises(MergeError, match=message):
        merge(method, base, tensors, **kwargs)


def test_linear_weights_summing_to_zero_are_fine_without_normalize():
    _, tensors = _models()
    got = merge("linear", None, tensors, normalize=False, model_parameters=per_model(weight=[1.0, -1.0]))
    assert_close(got, tensors[0] - tensors[1])


def test_slerp_takes_one_model_besides_the_base():
    base, tensors = _models()
    with pytest.raises(MergeError, match=r"'slerp' takes at most 1 model\(s\) besides the base, got 2"):
        merge_tensors("slerp", base, tensors, t=0.5)


def test_slerp_needs_t():
    base, tensors = _models()
    with pytest.raises(MergeError, match=r"method 'slerp' needs parameter 't'"):
        merge_tensors("slerp", base, tensors[:1])


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "model_stock", "slerp"])
def test_methods_that_need_a_base_reject_none(method):
    _, tensors = _models()
    with pytest.raises(MergeError, match=rf"method '{method}' needs a base_model"):
        merge_tensors(method, None, tensors, t=0.5)


@pytest.mark.parametrize("method", sorted(RANDOM_METHODS))
def test_random_methods_need_a_generator(method):
    base, tensors = _models()
    with pytest.raises(MergeError, match=rf"method '{method}' is random: pass generator="):
        merge_tensors(method, base, tensors, density=0.5)


# ---------------------------------------------------------------------- found while writing these tests


@pytest.mark.parametrize("value", [0, 1])
def test_rescale_rejects_integers_like_boolean_params_do(value):
    base, tensors = _models()
    with pytest.raises(MergeError, match="rescale"):
        merge("dare_linear", base, tensors, density=0.5, rescale=value)


@pytest.mark.parametrize("method, n_dicts", [("linear", 1), ("linear", 3), ("ties", 1)])
def test_model_parameters_must_match_the_number_of_models(method, n_dicts):
    base, tensors = _models()
    with pytest.raises(MergeError, match="model"):
        merge(method, base, tensors, model_parameters=[{"weight": 1.0}] * n_dicts)


@pytest.mark.parametrize("method", CURVATURE)
def test_negative_weights_are_refused_where_they_make_the_system_indefinite(method):
    base, tensors = make_models((4, 6), 2)
    with pytest.raises(MergeError, match=r"'weight' must lie in \[0"):
        merge(method, base, tensors, model_parameters=[{"weight": 1.0}, {"weight": -0.5}])
