"""Exact float64 oracles for the curvature-aware merges: Fisher merging, RegMean, MaTS and gradient matching.

Every expected value is computed here, independently of mergesmith: a least-squares fit of pooled data
(``torch.linalg.lstsq``), the minimiser of a quadratic found by one Newton step with autograd's gradient and
Hessian (exact for a quadratic), a dense solve of a materialised Kronecker sum, or the method's formula
written out entry by entry in Python. mergesmith's solvers are never the oracle.

Conventions (docs/design.md, "One equation behind every method"): a Linear weight W is (out, in); its Gram is
G = XᵀX / n over the layer's inputs (in, in); K-FAC's factors are A (in, in, or in+1 with a bias) and G (out,
out), and model i's precision acts as W ↦ G_i W A_i. Errors are normwise: ‖got − expected‖ / ‖expected‖.
"""

from __future__ import annotations

import math

import pytest
import torch

from mergesmith import merge_state_dicts
from mergesmith.errors import MergeError
from mergesmith.methods import merge_tensors

F64 = torch.float64
RTOL = 1e-6  # oracles that go through a solve
EXACT = 1e-12  # identities that hold up to rounding
CG_TOL = 1e-10  # the CG tolerance passed where a CG result is compared with a dense solve


# ---------------------------------------------------------------------- data and checks


def randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def uniform(shape: tuple[int, ...], seed: int, low: float, high: float) -> torch.Tensor:
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return low + (high - low) * u


def spd(n: int, seed: int) -> torch.Tensor:
    """A random symmetric positive-definite (n, n) matrix, eigenvalues bounded below by 0.1."""
    m = randn((n, n + 2), seed)
    return m @ m.T / (n + 2) + 0.1 * torch.eye(n, dtype=F64)


def per_model(**columns: list) -> list[dict]:
    """model_parameters from columns: per_model(weight=[1, 2]) -> [{"weight": 1}, {"weight": 2}]."""
    n = len(next(iter(columns.values())))
    return [{name: values[i] for name, values in columns.items()} for i in range(n)]


def flat(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.reshape(-1).tolist()]


def as_tensor(values: list[float], shape) -> torch.Tensor:
    return torch.tensor(values, dtype=F64).reshape(shape)


def assert_rel(got: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, what: str = "") -> None:
    """‖got − expected‖ / ‖expected‖ < rtol, with the numbers in the failure message."""
    assert tuple(got.shape) == tuple(expected.shape), f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    got = got.to(F64)
    assert torch.isfinite(got).all(), f"{what}: non-finite entries in {got}"
    error = float((got - expected).norm() / expected.norm())
    assert error < rtol, (f"{what}: relative error {error:.3e} >= {rtol:.0e}; max |diff| "
                          f"{float((got - expected).abs().max()):.3e}\n got      {got}\n expected {expected}")


def weighted_average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ_i λ_i θ_i / Σ_i λ_i, entry by entry."""
    values = [flat(t) for t in tensors]
    out = [sum(w * v[j] for w, v in zip(weights, values)) / sum(weights) for j in range(len(values[0]))]
    return as_tensor(out, tensors[0].shape)


def quadratic_minimiser(loss, dim: int) -> torch.Tensor:
    """argmin of a strictly convex quadratic ``loss`` on R^dim: one Newton step from 0 (exact for a quadratic),
    with the gradient and Hessian from autograd."""
    zero = torch.zeros(dim, dtype=F64)
    gradient = torch.autograd.functional.jacobian(loss, zero)
    hessian = torch.autograd.functional.hessian(loss, zero)
    return -torch.linalg.solve(hessian, gradient)


def kron_operator(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The matrix of W ↦ G W A on row-major vec(W): (G ⊗ Aᵀ), checked here on a random W."""
    matrix = torch.kron(g, a.T.contiguous())  # kron of a transposed view fails in torch
    w = randn((g.shape[0], a.shape[0]), 999)
    torch.testing.assert_close(matrix @ w.reshape(-1), (g @ w @ a).reshape(-1), rtol=1e-12, atol=1e-12)
    return matrix


def dense_kron_merge(weights, g_factors, a_factors, blocks) -> torch.Tensor:
    """Solve (Σ_i λ_i G_i ⊗ A_iᵀ) vec(X) = Σ_i λ_i (G_i ⊗ A_iᵀ) vec(W_i) densely: X with Σ λ G X A = Σ λ G W_i A."""
    operators = [lam * kron_operator(g, a) for lam, g, a in zip(weights, g_factors, a_factors)]
    lhs = sum(operators)
    rhs = sum(op @ w.reshape(-1) for op, w in zip(operators, blocks))
    return torch.linalg.solve(lhs, rhs).reshape(blocks[0].shape)


# ---------------------------------------------------------------------- 1. RegMean = pooled least squares

OUT, IN = 3, 5


def regression_tasks(ns: list[int], seed: int = 0):
    """Per task: inputs X_i (n_i, in), targets Y_i (n_i, out), W_i the exact least-squares fit of Y_i on X_i
    (so X_iᵀ X_i W_iᵀ = X_iᵀ Y_i), and the Gram G_i = X_iᵀ X_i / n_i."""
    xs, ys, ws, grams = [], [], [], []
    for i, n in enumerate(ns):
        x = randn((n, IN), seed + 10 * i) * uniform((1, IN), seed + 10 * i + 1, 0.5, 2.0)
        truth = randn((OUT, IN), seed + 10 * i + 2)
        y = x @ truth.T + 0.3 * randn((n, OUT), seed + 10 * i + 3)
        w = torch.linalg.lstsq(x, y).solution.T  # (out, in)
        xs.append(x)
        ys.append(y)
        ws.append(w)
        grams.append(x.T @ x / n)
    return xs, ys, ws, grams


def pooled_fit(xs, ys, row_weights) -> torch.Tensor:
    """argmin_W Σ_i r_i ‖X_i Wᵀ − Y_i‖²: least squares on the rows of task i scaled by sqrt(r_i)."""
    x = torch.cat([math.sqrt(r) * x for r, x in zip(row_weights, xs)])
    y = torch.cat([math.sqrt(r) * y for r, y in zip(row_weights, ys)])
    return torch.linalg.lstsq(x, y).solution.T


@pytest.mark.parametrize("ns", [[7, 11, 20], [9, 9, 9]])
def test_regmean_is_the_pooled_least_squares_fit(ns):
    xs, ys, ws, grams = regression_tasks(ns)
    got = merge_tensors("regmean", None, ws, stats=[{"gram": g} for g in grams])
    # each task's rows weighted by 1/n_i: the Gram is a mean over its rows
    assert_rel(got, pooled_fit(xs, ys, [1 / n for n in ns]), what="regmean vs 1/n_i-weighted pooled fit")
    if len(set(ns)) == 1:  # equal sizes: the plain pooled fit of all the data
        assert_rel(got, pooled_fit(xs, ys, [1.0] * len(ns)), what="regmean vs plain pooled fit")


def test_regmean_model_weights_scale_each_tasks_rows():
    ns, lambdas = [7, 11, 20], [0.5, 2.0, 1.25]
    xs, ys, ws, grams = regression_tasks(ns, seed=5)
    got = merge_tensors("regmean", None, ws, stats=[{"gram": g} for g in grams],
                        model_parameters=per_model(weight=lambdas))
    expected = pooled_fit(xs, ys, [lam / n for lam, n in zip(lambdas, ns)])
    assert_rel(got, expected, what="weighted regmean vs λ_i/n_i-weighted pooled fit")


def regmean_alpha_fit(xs, ys, ws, lambdas, alpha) -> torch.Tensor:
    """RegMean with G̃_i = α G_i + (1−α) diag(G_i) is the least-squares fit of the augmented data: task i's rows
    scaled by sqrt(λ_i α / n_i), and for each input j one row sqrt(λ_i (1−α) G_i[j,j]) e_jᵀ with target
    sqrt(λ_i (1−α) G_i[j,j]) W_i[:, j]ᵀ (pulling column j of W toward model i's)."""
    rows, targets = [], []
    for lam, x, y, w in zip(lambdas, xs, ys, ws):
        n = x.shape[0]
        rows.append(math.sqrt(lam * alpha / n) * x)
        targets.append(math.sqrt(lam * alpha / n) * y)
        diagonal = (x * x).sum(0) / n  # diag(G_i)
        for j in range(IN):
            scale = math.sqrt(lam * (1 - alpha) * float(diagonal[j]))
            rows.append(scale * torch.eye(IN, dtype=F64)[j:j + 1])
            targets.append(scale * w[:, j].reshape(1, OUT))
    return torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T


@pytest.mark.parametrize("alpha", [0.0, 0.4, 0.9])
def test_regmean_alpha_shrinks_the_gram_toward_its_diagonal(alpha):
    ns, lambdas = [7, 11, 20], [1.0, 0.5, 2.0]
    xs, ys, ws, grams = regression_tasks(ns, seed=7)
    got = merge_tensors("regmean", None, ws, stats=[{"gram": g} for g in grams], alpha=alpha,
                        model_parameters=per_model(weight=lambdas))
    assert_rel(got, regmean_alpha_fit(xs, ys, ws, lambdas, alpha), what=f"regmean alpha={alpha}")
    if alpha == 0.0:
        # diagonal Grams: column j of W is Σ_i λ_i G_i[j,j] W_i[:, j] / Σ_i λ_i G_i[j,j]
        expected = torch.zeros(OUT, IN, dtype=F64)
        for j in range(IN):
            d = [lam * float(g[j, j]) for lam, g in zip(lambdas, grams)]
            for r in range(OUT):
                expected[r, j] = sum(dj * float(w[r, j]) for dj, w in zip(d, ws)) / sum(d)
        assert_rel(got, expected, rtol=EXACT * 100, what="regmean alpha=0, column by column")


# ---------------------------------------------------------------------- 2. Fisher merging on quadratics

SHAPE = (3, 4)
DIM = 12


def test_fisher_merge_is_the_joint_minimiser_of_quadratic_losses():
    """L_i(θ) = ½ (θ − m_i)ᵀ diag(h_i) (θ − m_i): θ_i = m_i minimises L_i, F_i = h_i; the merge minimises Σ λ_i L_i."""
    lambdas = [0.5, 1.5, 2.0]
    means = [randn(SHAPE, 100 + i) for i in range(3)]
    curvatures = [uniform(SHAPE, 110 + i, 0.05, 3.0) for i in range(3)]

    def loss(theta):
        return sum(0.5 * lam * (h.reshape(-1) * (theta - m.reshape(-1)) ** 2).sum()
                   for lam, m, h in zip(lambdas, means, curvatures))

    expected = quadratic_minimiser(loss, DIM).reshape(SHAPE)
    got = merge_tensors("fisher", None, means, stats=[{"fisher": h} for h in curvatures], fisher_floor=0.0,
                        model_parameters=per_model(weight=lambdas))
    assert_rel(got, expected, what="fisher vs argmin Σ λ_i L_i")


def fisher_oracle(tensors, fishers, weights, *, normalize: str, floor: float, first_only: bool) -> torch.Tensor:
    """F̂_i = F_i / s_i (s_i = 1, or ‖F_i‖₂ over the tensor for global/per_tensor), then F̂_i ← max(F̂_i, floor)
    for every model (only model 0 when first_only); θ = Σ λ_i F̂_i θ_i / Σ λ_i F̂_i, or Σ λ_i θ_i / Σ λ_i where
    the denominator is 0."""
    values = [flat(t) for t in tensors]
    fs = [flat(f) for f in fishers]
    if normalize != "none":
        fs = [[x / math.sqrt(sum(y * y for y in f)) for x in f] for f in fs]
    fs = [[max(x, floor) for x in f] if (i == 0 or not first_only) else f for i, f in enumerate(fs)]
    out = []
    for j in range(len(values[0])):
        denominator = sum(w * f[j] for w, f in zip(weights, fs))
        if denominator == 0:
            out.append(sum(w * v[j] for w, v in zip(weights, values)) / sum(weights))
        else:
            out.append(sum(w * f[j] * v[j] for w, f, v in zip(weights, fs, values)) / denominator)
    return as_tensor(out, tensors[0].shape)


@pytest.mark.parametrize("normalize", ["none", "global", "per_tensor"])
@pytest.mark.parametrize("floor", [0.0, 0.05])
@pytest.mark.parametrize("first_only", [False, True])
def test_fisher_floor_and_normalisation(normalize, floor, first_only):
    lambdas = [0.7, 1.3, 1.0]
    tensors = [randn(SHAPE, 200 + i) for i in range(3)]
    fishers = [uniform(SHAPE, 210 + i, 0.0, 2.0) * (10.0 ** i) for i in range(3)]  # different scales
    fishers[1][0, :2] = 0.0  # one model cares about nothing there
    fishers[2][1, 3] = 1e-9  # below every floor tried
    for f in fishers:  # nobody cares about entry (2, 1): the weighted average (or model 0's floor) decides
        f[2, 1] = 0.0
    got = merge_tensors("fisher", None, tensors, stats=[{"fisher": f} for f in fishers], fisher_floor=floor,
                        fisher_normalize=normalize, floor_first_only=first_only,
                        model_parameters=per_model(weight=lambdas))
    expected = fisher_oracle(tensors, fishers, lambdas, normalize=normalize, floor=floor, first_only=first_only)
    assert_rel(got, expected, rtol=1e-10, what=f"fisher normalize={normalize} floor={floor} first_only={first_only}")


def test_fisher_default_floor_is_1e_6():
    tensors = [randn(SHAPE, 220 + i) for i in range(2)]
    fishers = [torch.zeros(SHAPE, dtype=F64), uniform(SHAPE, 222, 0.0, 1e-5)]
    got = merge_tensors("fisher", None, tensors, stats=[{"fisher": f} for f in fishers])
    expected = fisher_oracle(tensors, fishers, [1.0, 1.0], normalize="none", floor=1e-6, first_only=False)
    assert_rel(got, expected, rtol=1e-10, what="fisher with the default floor")


def test_fisher_with_equal_fishers_is_the_weighted_average():
    lambdas = [0.5, 1.5, 2.0]
    tensors = [randn(SHAPE, 230 + i) for i in range(3)]
    ones = [{"fisher": torch.ones(SHAPE, dtype=F64)} for _ in tensors]
    got = merge_tensors("fisher", None, tensors, stats=ones, model_parameters=per_model(weight=lambdas))
    assert_rel(got, weighted_average(tensors, lambdas), rtol=EXACT, what="fisher with identity Fisher")


# ---------------------------------------------------------------------- 3, 4. gradient matching


def count_value(i: int, n: float):
    """fisher_count in each of the accepted forms: a Python int, a float, a 0-d tensor."""
    return [int(n), float(n), torch.tensor(float(n), dtype=F64)][i % 3]


@pytest.mark.parametrize("prior", [0.0, 0.7, "base"])
@pytest.mark.parametrize("counts_from", ["fisher_count", "data_size", "data_size_overrides_count"])
def test_gradient_matching_is_the_joint_minimiser_of_quadratics(prior, counts_from):
    """Fine-tune t minimises L_t(θ) + ½(θ−θ_0)ᵀH_0(θ−θ_0), L_t = ½(θ−m_t)ᵀH_t(θ−m_t), H_t = N_t F_t; the merge is
    the minimiser of ½(θ−θ_0)ᵀH_0(θ−θ_0) + Σ_t α_t L_t(θ)."""
    alphas, sizes = [0.6, 1.0, 1.7], [7, 11, 20]
    base = randn(SHAPE, 300).reshape(-1)
    means = [randn((DIM,), 301 + t) for t in range(3)]
    fishers = [uniform((DIM,), 311 + t, 0.05, 1.5) for t in range(3)]
    hessians = [n * f for n, f in zip(sizes, fishers)]
    base_size, base_fisher = 13, uniform((DIM,), 320, 0.01, 0.5)
    h0 = base_size * base_fisher if prior == "base" else torch.full((DIM,), float(prior), dtype=F64)

    def prior_loss(theta):
        return 0.5 * (h0 * (theta - base) ** 2).sum()

    def task_loss(t):
        return lambda theta: 0.5 * (hessians[t] * (theta - means[t]) ** 2).sum()

    tunes = [quadratic_minimiser(lambda th, t=t: task_loss(t)(th) + prior_loss(th), DIM) for t in range(3)]
    expected = quadratic_minimiser(lambda th: prior_loss(th) + sum(a * task_loss(t)(th)
                                                                   for t, a in enumerate(alphas)), DIM)

    stats = [{"fisher": f.reshape(SHAPE)} for f in fishers]
    columns = {"weight": alphas}
    if counts_from == "fisher_count":
        for i, (s, n) in enumerate(zip(stats, sizes)):
            s["fisher_count"] = count_value(i, n)
    else:
        columns["data_size"] = [float(n) for n in sizes]
        if counts_from == "data_size_overrides_count":
            for s in stats:
                s["fisher_count"] = 1
    base_stats = {"fisher": base_fisher.reshape(SHAPE), "fisher_count": base_size} if prior == "base" else None
    got = merge_tensors("gradient_matching", base.reshape(SHAPE), [t.reshape(SHAPE) for t in tunes], stats=stats,
                        base_stats=base_stats, prior=prior, model_parameters=per_model(**columns))
    assert_rel(got, expected.reshape(SHAPE), what=f"gradient matching prior={prior} counts from {counts_from}")


def test_gradient_matching_with_unit_hessians_is_task_arithmetic():
    """H_t = I (Fisher 1, data size 1), H_0 = 0: θ = θ_0 + Σ_t α_t τ_t / Σ_t α_t."""
    alphas = [0.5, 1.25, 2.0]
    base = randn(SHAPE, 400)
    tunes = [base + randn(SHAPE, 401 + t) for t in range(3)]
    stats = [{"fisher": torch.ones(SHAPE, dtype=F64), "fisher_count": 1} for _ in tunes]
    got = merge_tensors("gradient_matching", base, tunes, stats=stats, prior=0.0,
                        model_parameters=per_model(weight=alphas))
    b, taus = flat(base), [[x - y for x, y in zip(flat(t), flat(base))] for t in tunes]
    expected = as_tensor([b[j] + sum(a * tau[j] for a, tau in zip(alphas, taus)) / sum(alphas)
                          for j in range(len(b))], SHAPE)
    assert_rel(got, expected, rtol=EXACT, what="gradient matching with unit Hessians")
    task_arithmetic = merge_tensors("task_arithmetic", base, tunes, **{"lambda": 1 / sum(alphas)},
                                    model_parameters=per_model(weight=alphas))
    assert_rel(got, task_arithmetic.to(F64), rtol=EXACT, what="gradient matching vs merge_tensors task_arithmetic")
    explicit = merge_tensors("gradient_matching", base, tunes, stats=[{"fisher": s["fisher"]} for s in stats],
                             model_parameters=per_model(weight=alphas, data_size=[1.0, 1.0, 1.0]))
    assert_rel(explicit, expected, rtol=EXACT, what="gradient matching, data_size 1 and the default prior 0")


def test_gradient_matching_entries_without_precision_take_the_task_arithmetic_limit():
    """Where H̄ = H_0 + Σ α_t H_t = 0 (prior 0, every Fisher 0), θ_0 + Σ α_t τ_t / Σ α_t; elsewhere the formula
    θ_0 + Σ_t α_t H_t τ_t / Σ_t α_t H_t."""
    alphas, sizes = [0.5, 1.0, 3.0], [4, 5, 6]
    base = randn(SHAPE, 410)
    tunes = [base + randn(SHAPE, 411 + t) for t in range(3)]
    fishers = [uniform(SHAPE, 421 + t, 0.1, 1.0) for t in range(3)]
    fishers[0][0, 0] = 0.0  # one model without precision: still a solve
    for f in fishers:
        f[1, :] = 0.0
    got = merge_tensors("gradient_matching", base, tunes,
                        stats=[{"fisher": f, "fisher_count": n} for f, n in zip(fishers, sizes)],
                        prior=0.0, model_parameters=per_model(weight=alphas))
    b = flat(base)
    taus = [[x - y for x, y in zip(flat(t), b)] for t in tunes]
    hs = [[n * x for x in flat(f)] for f, n in zip(fishers, sizes)]
    out = []
    for j in range(len(b)):
        total = sum(a * h[j] for a, h in zip(alphas, hs))
        if total == 0:
            out.append(b[j] + sum(a * tau[j] for a, tau in zip(alphas, taus)) / sum(alphas))
        else:
            out.append(b[j] + sum(a * h[j] * tau[j] for a, h, tau in zip(alphas, hs, taus)) / total)
    assert_rel(got, as_tensor(out, SHAPE), rtol=EXACT, what="gradient matching with zero-precision entries")


# ---------------------------------------------------------------------- 5. MaTS

KOUT, KIN = 4, 3
INITS = ["average", "base", "task_arithmetic"]


def kfac_models(seed: int = 500, n: int = 3):
    base = randn((KOUT, KIN), seed)
    tunes = [base + randn((KOUT, KIN), seed + 1 + i) for i in range(n)]
    a_factors = [spd(KIN, seed + 10 + i) for i in range(n)]
    g_factors = [spd(KOUT, seed + 20 + i) for i in range(n)]
    return base, tunes, a_factors, g_factors


@pytest.mark.parametrize("init", INITS)
def test_mats_identity_precision_is_the_weighted_average(init):
    lambdas = [0.5, 1.0, 2.0]
    base, tunes, _, _ = kfac_models()
    got = merge_tensors("mats", base, tunes, precision="identity", init=init, **{"lambda": 0.3},
                        model_parameters=per_model(weight=lambdas))
    assert_rel(got, weighted_average(tunes, lambdas), rtol=1e-9, what=f"mats identity, init {init}")


@pytest.mark.parametrize("preconditioner", [True, False])
@pytest.mark.parametrize("init", INITS)
def test_mats_kfac_equals_a_dense_solve_of_the_kronecker_sum(preconditioner, init):
    lambdas = [0.5, 1.0, 2.0]
    base, tunes, a_factors, g_factors = kfac_models()
    expected = dense_kron_merge(lambdas, g_factors, a_factors, tunes)
    got = merge_tensors("mats", base, tunes, stats=[{"kfac_a": a, "kfac_g": g} for a, g in zip(a_factors, g_factors)],
                        precision="kfac", init=init, preconditioner=preconditioner, tol=CG_TOL, damping=0.0,
                        model_parameters=per_model(weight=lambdas))
    assert_rel(got, expected, what=f"mats kfac (preconditioner={preconditioner}, init={init}) vs dense solve")


def test_mats_kfac_damping_adds_a_relative_multiple_of_the_identity_to_each_factor():
    lambdas, delta = [0.5, 1.0, 2.0], 0.3
    base, tunes, a_factors, g_factors = kfac_models(seed=510)

    def damp(f):
        return f + delta * (torch.trace(f) / f.shape[0]) * torch.eye(f.shape[0], dtype=f.dtype)

    expected = dense_kron_merge(lambdas, [damp(g) for g in g_factors], [damp(a) for a in a_factors], tunes)
    got = merge_tensors("mats", base, tunes, stats=[{"kfac_a": a, "kfac_g": g} for a, g in zip(a_factors, g_factors)],
                        precision="kfac", init="average", tol=CG_TOL, damping=delta,
                        model_parameters=per_model(weight=lambdas))
    assert_rel(got, expected, what="mats kfac with damping vs dense solve of the damped factors")


def test_mats_kfac_preconditioner_is_exact_for_shared_factors():
    """All models share A and G: Σ λ_i G X A = G (Σ λ_i W_i) A gives the weighted average, and the Kronecker
    preconditioner built from the mean factors is then the exact inverse, so one CG step from the base solves it."""
    lambdas = [0.5, 1.0, 2.0]
    base, tunes, a_factors, g_factors = kfac_models(seed=520)
    stats = [{"kfac_a": a_factors[0], "kfac_g": g_factors[0]} for _ in tunes]
    got = merge_tensors("mats", base, tunes, stats=stats, precision="kfac", init="base", preconditioner=True,
                        damping=0.0, max_iters=1, model_parameters=per_model(weight=lambdas))
    assert_rel(got, weighted_average(tunes, lambdas), rtol=1e-9, what="mats kfac, shared factors, one CG step")


def test_mats_fisher_precision_is_fisher_merging():
    lambdas = [0.5, 1.5, 2.0]
    base = randn(SHAPE, 600)
    tunes = [base + randn(SHAPE, 601 + i) for i in range(3)]
    fishers = [uniform(SHAPE, 611 + i, 0.05, 2.0) for i in range(3)]
    stats = [{"fisher": f} for f in fishers]
    got = merge_tensors("mats", base, tunes, stats=stats, precision="fisher", init="average",
                        model_parameters=per_model(weight=lambdas))
    expected = fisher_oracle(tunes, fishers, lambdas, normalize="none", floor=0.0, first_only=False)
    assert_rel(got, expected, what="mats fisher vs Σ λ F θ / Σ λ F")
    fisher = merge_tensors("fisher", None, tunes, stats=stats, fisher_floor=0.0,
                           model_parameters=per_model(weight=lambdas))
    assert_rel(got, fisher.to(F64), what="mats fisher vs merge_tensors('fisher', floor 0)")


def test_mats_gram_precision_is_regmean():
    ns, lambdas = [7, 11, 20], [0.5, 2.0, 1.25]
    xs, ys, ws, grams = regression_tasks(ns, seed=9)
    base = randn((OUT, IN), 650)
    stats = [{"gram": g} for g in grams]
    got = merge_tensors("mats", base, ws, stats=stats, precision="gram", init="average",
                        model_parameters=per_model(weight=lambdas))
    assert_rel(got, pooled_fit(xs, ys, [lam / n for lam, n in zip(lambdas, ns)]), what="mats gram vs pooled fit")
    regmean = merge_tensors("regmean", None, ws, stats=stats, model_parameters=per_model(weight=lambdas))
    assert_rel(got, regmean.to(F64), what="mats gram vs merge_tensors('regmean')")


# ---------------------------------------------------------------------- 6. merge_state_dicts end to end

MODELS = ["ft_a", "ft_b", "ft_c"]
STATS = ["st_a", "st_b", "st_c"]
WEIGHTS = [0.5, 1.0, 2.0]
SHAPES = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 4)}


def tiny_states(seed: int = 700) -> dict[str, dict[str, torch.Tensor]]:
    states = {}
    for k, name in enumerate(["base", *MODELS]):
        states[name] = {key: randn(shape, seed + 10 * k + j) for j, (key, shape) in enumerate(SHAPES.items())}
    return states


def recipe(method: str, parameters: dict | None = None, base_model=None) -> dict:
    out = {"merge_method": method,
           "models": [{"model": m, "stats": s, "parameters": {"weight": w}} for m, s, w in zip(MODELS, STATS, WEIGHTS)]}
    if parameters:
        out["parameters"] = parameters
    if base_model is not None:
        out["base_model"] = base_model
    return out


def grams_from_data(seed: int, zero_feature: int | None = None) -> dict[str, torch.Tensor]:
    """gram/a (3, 3) and gram/b (4, 4) as XᵀX/n of random inputs (a chosen input of layer a always 0)."""
    stats = {}
    for k, (module, width, n) in enumerate([("a", 3, 8), ("b", 4, 9)]):
        x = randn((n, width), seed + k)
        if module == "a" and zero_feature is not None:
            x[:, zero_feature] = 0.0
        stats[f"gram/{module}"] = x.T @ x / n
    return stats


def gram_solve(weights, grams, tensors) -> torch.Tensor:
    """W with (Σ λ_i G_i) Wᵀ = Σ λ_i G_i W_iᵀ, by a dense solve."""
    lhs = sum(lam * g for lam, g in zip(weights, grams))
    rhs = sum(lam * g @ w.T for lam, g, w in zip(weights, grams, tensors))
    return torch.linalg.solve(lhs, rhs).T


def test_merge_state_dicts_regmean_solves_weights_and_averages_the_bias():
    states = tiny_states()
    statistics = {s: grams_from_data(710 + 10 * i) for i, s in enumerate(STATS)}
    merged = merge_state_dicts(recipe("regmean"), states, statistics=statistics, compute_dtype=F64)
    assert sorted(merged) == sorted(SHAPES)
    for module in ("a", "b"):
        expected = gram_solve(WEIGHTS, [statistics[s][f"gram/{module}"] for s in STATS],
                              [states[m][f"{module}.weight"] for m in MODELS])
        assert_rel(merged[f"{module}.weight"], expected, what=f"regmean {module}.weight vs dense Gram solve")
    assert_rel(merged["a.bias"], weighted_average([states[m]["a.bias"] for m in MODELS], WEIGHTS), rtol=EXACT,
               what="regmean a.bias: linear fallback")


def test_merge_state_dicts_mats_kfac_solves_weight_and_bias_jointly():
    states = tiny_states(seed=720)
    statistics = {}
    for i, s in enumerate(STATS):
        statistics[s] = {"kfac_a/a": spd(4, 730 + 10 * i), "kfac_g/a": spd(4, 731 + 10 * i),  # A: in + 1 = 4
                         "kfac_a/b": spd(4, 732 + 10 * i), "kfac_g/b": spd(2, 733 + 10 * i)}
    parameters = {"precision": "kfac", "init": "average", "tol": CG_TOL, "damping": 0.0}
    merged = merge_state_dicts(recipe("mats", parameters), states, statistics=statistics, compute_dtype=F64)
    blocks = [torch.cat([states[m]["a.weight"], states[m]["a.bias"][:, None]], dim=1) for m in MODELS]  # (4, 3+1)
    expected = dense_kron_merge(WEIGHTS, [statistics[s]["kfac_g/a"] for s in STATS],
                                [statistics[s]["kfac_a/a"] for s in STATS], blocks)
    assert_rel(merged["a.weight"], expected[:, :3], what="mats kfac a.weight, from the joint [W | b] solve")
    assert_rel(merged["a.bias"], expected[:, 3], what="mats kfac a.bias, from the joint [W | b] solve")
    expected_b = dense_kron_merge(WEIGHTS, [statistics[s]["kfac_g/b"] for s in STATS],
                                  [statistics[s]["kfac_a/b"] for s in STATS], [states[m]["b.weight"] for m in MODELS])
    assert_rel(merged["b.weight"], expected_b, what="mats kfac b.weight vs dense solve")


def test_merge_state_dicts_gradient_matching_uses_each_parameters_fisher():
    states = tiny_states(seed=740)
    sizes, prior = [5.0, 8.0, 13.0], 0.4
    statistics = {s: {f"fisher/{key}": uniform(shape, 750 + 10 * i + j, 0.05, 1.0)
                      for j, (key, shape) in enumerate(SHAPES.items())} for i, s in enumerate(STATS)}
    spec = recipe("gradient_matching", {"prior": prior}, base_model="base")
    for entry, n in zip(spec["models"], sizes):
        entry["parameters"]["data_size"] = n
    merged = merge_state_dicts(spec, states, statistics=statistics, compute_dtype=F64)
    for key in SHAPES:
        base = states["base"][key]
        hs = [n * statistics[s][f"fisher/{key}"] for n, s in zip(sizes, STATS)]
        taus = [states[m][key] - base for m in MODELS]
        # θ_0 + H̄⁻¹ Σ α (H_0 + H_t) τ_t, H̄ = H_0 + Σ α H_t, H_0 = prior·1
        numerator = sum(a * (prior + h) * tau for a, h, tau in zip(WEIGHTS, hs, taus))
        expected = base + numerator / (prior + sum(a * h for a, h in zip(WEIGHTS, hs)))
        assert_rel(merged[key], expected, what=f"gradient matching {key}")


def lookahead(*words: str) -> str:
    """A regex that matches a message containing every word, in any order."""
    import re

    return "(?s)^" + "".join(f"(?=.*{re.escape(w)})" for w in words)


@pytest.mark.parametrize("method, parameters, drop, model, kind", [
    ("regmean", None, ("st_b", "gram/b"), "ft_b", "gram"),
    ("mats", {"precision": "kfac", "init": "average"}, ("st_c", "kfac_g/a"), "ft_c", "kfac_g"),
])
def test_merge_state_dicts_missing_statistics_names_the_model_and_kind(method, parameters, drop, model, kind):
    states = tiny_states()
    if method == "regmean":
        statistics = {s: grams_from_data(760 + 10 * i) for i, s in enumerate(STATS)}
    else:
        statistics = {s: {"kfac_a/a": spd(4, 770 + i), "kfac_g/a": spd(4, 771 + i), "kfac_a/b": spd(4, 772 + i),
                          "kfac_g/b": spd(2, 773 + i)} for i, s in enumerate(STATS)}
    del statistics[drop[0]][drop[1]]
    with pytest.raises(MergeError, match=lookahead(model, kind)):
        merge_state_dicts(recipe(method, parameters), states, statistics=statistics, compute_dtype=F64)


@pytest.mark.parametrize("bad_value", [float("nan"), -0.5])
@pytest.mark.parametrize("tensor", ["a.bias", "b.weight"])
def test_merge_state_dicts_rejects_a_nan_or_negative_fisher(bad_value, tensor):
    states = tiny_states()
    statistics = {s: {f"fisher/{key}": uniform(shape, 780 + 10 * i + j, 0.1, 1.0)
                      for j, (key, shape) in enumerate(SHAPES.items())} for i, s in enumerate(STATS)}
    statistics["st_b"][f"fisher/{tensor}"].reshape(-1)[1] = bad_value
    with pytest.raises(MergeError, match=lookahead(tensor)):
        merge_state_dicts(recipe("fisher"), states, statistics=statistics, compute_dtype=F64)


def test_merge_state_dicts_singular_gram_sum_warns_and_solves_the_range():
    """Input 1 of layer a is 0 in every model's data: the Gram sum S has a zero row and column. The result must
    be finite, satisfy the normal equations S Wᵀ = Σ λ_i G_i W_iᵀ, and on the other inputs equal the solve of
    the reduced (non-singular) system; the merge warns."""
    states = tiny_states(seed=790)
    statistics = {s: grams_from_data(800 + 10 * i, zero_feature=1) for i, s in enumerate(STATS)}
    with pytest.warns(Warning):
        merged = merge_state_dicts(recipe("regmean"), states, statistics=statistics, compute_dtype=F64)
    w = merged["a.weight"].to(F64)
    assert torch.isfinite(w).all()
    grams = [statistics[s]["gram/a"] for s in STATS]
    tensors = [states[m]["a.weight"] for m in MODELS]
    lhs = sum(lam * g for lam, g in zip(WEIGHTS, grams))
    rhs = sum(lam * g @ t.T for lam, g, t in zip(WEIGHTS, grams, tensors))
    assert float(lhs[1].abs().max()) == 0.0 and float(rhs[1].abs().max()) == 0.0  # the singular direction
    residual = float((lhs @ w.T - rhs).norm() / rhs.norm())
    assert residual < RTOL, f"normal equations: relative residual {residual:.3e}"
    keep = [0, 2]
    reduced = torch.linalg.solve(lhs[keep][:, keep], rhs[keep]).T
    assert_rel(w[:, keep], reduced, what="a.weight on the Gram's range vs the reduced solve")
    expected_b = gram_solve(WEIGHTS, [statistics[s]["gram/b"] for s in STATS], [states[m]["b.weight"] for m in MODELS])
    assert_rel(merged["b.weight"], expected_b, what="b.weight (non-singular) vs dense solve")


# ---------------------------------------------------------------------- 7. MaTS with normalized precisions

def frobenius(*tensors: torch.Tensor) -> float:
    return float(sum(t.double().square().sum() for t in tensors)) ** 0.5


def test_mats_precision_normalize_divides_each_models_precision_by_its_whole_model_norm():
    """precision_normalize: global is the solve with every model's C_i divided by its norm: for K-FAC, scaling a
    model's A ⊗ G by 1/c; for the Fisher, F_i / ‖F_i‖ — checked against dense solves of the pre-scaled systems, with
    norms far apart (one model's statistics 10⁴ times the others', as measured on the text suite)."""
    lambdas = [0.5, 1.0, 2.0]
    base, tunes, a_factors, g_factors = kfac_models(seed=530)
    g_factors = [g * c for g, c in zip(g_factors, (1.0, 1e4, 3.0))]
    norms = [7.0, 2e4, 0.5]  # given: merge_tensors takes the whole-model norm as the engine supplies it
    stats = [{"kfac_a": a, "kfac_g": g, "kfac_norm": n} for a, g, n in zip(a_factors, g_factors, norms)]
    got = merge_tensors("mats", base, tunes, stats=stats, precision="kfac", init="average", tol=CG_TOL,
                        damping=0.0, precision_normalize="global", model_parameters=per_model(weight=lambdas))
    expected = dense_kron_merge(lambdas, [g / n for g, n in zip(g_factors, norms)], a_factors, tunes)
    assert_rel(got, expected, what="mats kfac normalize: global vs the dense solve of the scaled factors")
    plain = dense_kron_merge(lambdas, g_factors, a_factors, tunes)
    assert float((plain - expected).abs().max()) > 1e-3  # the scales matter: not the same merge

    fishers = [uniform((KOUT, KIN), 540 + i, 0.05, 2.0) * c for i, c in enumerate((1.0, 1e4, 3.0))]
    stats = [{"fisher": f, "fisher_norm": n} for f, n in zip(fishers, norms)]
    got = merge_tensors("mats", base, tunes, stats=stats, precision="fisher", init="average",
                        precision_normalize="global", model_parameters=per_model(weight=lambdas))
    scaled = [f / n for f, n in zip(fishers, norms)]
    expected = sum(lam * f * t for lam, f, t in zip(lambdas, scaled, tunes)) / sum(
        lam * f for lam, f in zip(lambdas, scaled))
    assert_rel(got, expected, what="mats fisher normalize: global vs Σ λ F̂ θ / Σ λ F̂")


@pytest.mark.parametrize("precision", ["kfac", "fisher", "gram"])
def test_merge_state_dicts_mats_precision_normalize_reads_each_models_norm_from_its_whole_sidecar(precision):
    """The engine supplies each model's norm over all of its sidecar's layers, not the tensor's own."""
    states = tiny_states(seed=760)
    statistics = {}
    for i, s in enumerate(STATS):
        scale = (1.0, 50.0, 0.2)[i]
        statistics[s] = {"kfac_a/a": spd(4, 770 + 10 * i), "kfac_g/a": scale * spd(4, 771 + 10 * i),
                         "kfac_a/b": spd(4, 772 + 10 * i), "kfac_g/b": scale * spd(2, 773 + 10 * i),
                         "gram/a": scale * spd(3, 774 + 10 * i), "gram/b": scale * spd(4, 775 + 10 * i),
                         **{f"fisher/{key}": scale * uniform(shape, 776 + 10 * i + j, 0.05, 1.0)
                            for j, (key, shape) in enumerate(SHAPES.items())}}
    parameters = {"precision": precision, "init": "average", "tol": CG_TOL, "damping": 0.0,
                  "precision_normalize": "global"}
    merged = merge_state_dicts(recipe("mats", parameters), states, statistics=statistics, compute_dtype=F64)
    st = [statistics[s] for s in STATS]
    for module in ("a", "b"):
        if precision == "kfac":
            norms = [(frobenius(x["kfac_a/a"]) ** 2 * frobenius(x["kfac_g/a"]) ** 2
                      + frobenius(x["kfac_a/b"]) ** 2 * frobenius(x["kfac_g/b"]) ** 2) ** 0.5 for x in st]
            if module == "a":  # [W | b] solved jointly
                blocks = [torch.cat([states[m]["a.weight"], states[m]["a.bias"][:, None]], dim=1) for m in MODELS]
            else:
                blocks = [states[m]["b.weight"] for m in MODELS]
            expected = dense_kron_merge(WEIGHTS, [x[f"kfac_g/{module}"] / n for x, n in zip(st, norms)],
                                        [x[f"kfac_a/{module}"] for x in st], blocks)
            assert_rel(merged[f"{module}.weight"], expected[:, :3] if module == "a" else expected,
                       what=f"kfac {module}")
        elif precision == "gram":
            norms = [frobenius(x["gram/a"], x["gram/b"]) for x in st]
            expected = gram_solve(WEIGHTS, [x[f"gram/{module}"] / n for x, n in zip(st, norms)],
                                  [states[m][f"{module}.weight"] for m in MODELS])
            assert_rel(merged[f"{module}.weight"], expected, what=f"gram {module}")
        else:
            norms = [frobenius(*(x[f"fisher/{k}"] for k in SHAPES)) for x in st]
            key = f"{module}.weight"
            scaled = [x[f"fisher/{key}"] / n for x, n in zip(st, norms)]
            expected = sum(w * f * states[m][key] for w, f, m in zip(WEIGHTS, scaled, MODELS)) / sum(
                w * f for w, f in zip(WEIGHTS, scaled))
            assert_rel(merged[key], expected, what=f"fisher {key}")
