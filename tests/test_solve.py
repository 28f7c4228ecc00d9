"""The solvers in ``mergesmith.solve`` against dense float64 computations written out here.

Vec convention of the dense oracle: row-major vec (``X.reshape(-1)``), for which vec(G X A) = (G ⊗ Aᵀ) vec(X),
so Σ_i w_i G_i X A_i = rhs is the dense system (Σ_i w_i G_i ⊗ A_iᵀ) vec(X) = vec(rhs), solved here with
``torch.linalg.solve``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.errors import StatisticsError
from mergesmith.solve import SolveWarning, kron_cg, kron_matvec, solve_diagonal, solve_gram

F64 = torch.float64


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(shape, generator=generator(seed), dtype=dtype)


def random_spd(*shape: int, seed: int) -> torch.Tensor:
    """Symmetric positive definite (..., n, n) with eigenvalues spread over about two decades."""
    *batch, n, _ = shape
    q = torch.linalg.qr(randn(*batch, n, n, seed=seed)).Q
    eigenvalues = torch.logspace(-1, 1, n, dtype=F64) * (1 + torch.rand(*batch, n, generator=generator(seed),
                                                                        dtype=F64))
    return q @ torch.diag_embed(eigenvalues) @ q.mT


def dense_operator(a_factors, g_factors, weights) -> torch.Tensor:
    return sum(w * torch.kron(g, a.T.contiguous()) for a, g, w in zip(a_factors, g_factors, weights))


def dense_solve(a_factors, g_factors, rhs, weights) -> torch.Tensor:
    out, inp = rhs.shape
    return torch.linalg.solve(dense_operator(a_factors, g_factors, weights), rhs.reshape(-1)).reshape(out, inp)


def relative_error(x: torch.Tensor, expected: torch.Tensor) -> float:
    return float((x - expected).norm() / expected.norm())


def random_system(out: int, inp: int, n_models: int, seed: int, batch: tuple[int, ...] = ()):
    a_factors = [random_spd(*batch, inp, inp, seed=seed + 10 * i) for i in range(n_models)]
    g_factors = [random_spd(*batch, out, out, seed=seed + 10 * i + 5) for i in range(n_models)]
    weights = (torch.rand(n_models, generator=generator(seed), dtype=F64) + 0.1).tolist()
    return a_factors, g_factors, randn(*batch, out, inp, seed=seed + 999), weights


# ---------------------------------------------------------------------- kron_cg


def test_the_dense_oracle_uses_the_stated_vec_convention():
    a, g, x = randn(4, 4, seed=1), randn(3, 3, seed=2), randn(3, 4, seed=3)  # not symmetric: Aᵀ matters
    expected = torch.kron(g, a.T.contiguous()) @ x.reshape(-1)
    assert torch.allclose((g @ x @ a).reshape(-1), expected, rtol=1e-12, atol=1e-12)


def test_kron_matvec_equals_the_dense_kronecker_sum():
    a_factors, g_factors, x, weights = random_system(5, 7, 3, seed=0)
    expected = dense_operator(a_factors, g_factors, weights) @ x.reshape(-1)
    assert torch.allclose(kron_matvec(a_factors, g_factors, x, weights).reshape(-1), expected, rtol=1e-12)


@pytest.mark.parametrize("precondition", [True, False])
def test_kron_cg_equals_a_dense_solve(precondition):
    a_factors, g_factors, rhs, weights = random_system(5, 7, 3, seed=1)
    x, report = kron_cg(a_factors, g_factors, rhs, weights=weights, precondition=precondition, tol=1e-12,
                        max_iters=200)
    assert relative_error(x, dense_solve(a_factors, g_factors, rhs, weights)) < 1e-6
    assert bool(report.converged) and float(report.final_residual) <= 1e-12
    assert float(report.initial_residual) == pytest.approx(1.0)  # x0 = 0: the residual is rhs itself


def test_preconditioning_cuts_iterations_on_factors_near_each_other():
    a_common, g_common = random_spd(8, 8, seed=3), random_spd(6, 6, seed=4)
    a_factors = [a_common + 0.05 * random_spd(8, 8, seed=10 + i) for i in range(3)]
    g_factors = [g_common + 0.05 * random_spd(6, 6, seed=20 + i) for i in range(3)]
    rhs = randn(6, 8, seed=5)
    _, plain = kron_cg(a_factors, g_factors, rhs, precondition=False, tol=1e-10, max_iters=200)
    _, preconditioned = kron_cg(a_factors, g_factors, rhs, precondition=True, tol=1e-10, max_iters=200)
    assert preconditioned.iterations * 3 <= plain.iterations


@pytest.mark.parametrize("precondition", [True, False])
def test_batched_blocks_equal_block_by_block_dense_solves(precondition):
    batch = (2, 3)
    a_factors, g_factors, rhs, weights = random_system(4, 6, 2, seed=7, batch=batch)
    x, report = kron_cg(a_factors, g_factors, rhs, weights=weights, precondition=precondition, tol=1e-12,
                        max_iters=200)
    assert report.converged.shape == batch and bool(report.converged.all())
    for index in [(i, j) for i in range(2) for j in range(3)]:
        expected = dense_solve([a[index] for a in a_factors], [g[index] for g in g_factors], rhs[index], weights)
        assert relative_error(x[index], expected) < 1e-6


def test_factors_broadcast_over_a_batch_of_right_hand_sides():
    a_factors, g_factors, _, weights = random_system(4, 5, 3, seed=8)
    rhs = randn(3, 4, 5, seed=9)
    x, _ = kron_cg(a_factors, g_factors, rhs, weights=weights, tol=1e-12, max_iters=200)
    for k in range(3):
        assert relative_error(x[k], dense_solve(a_factors, g_factors, rhs[k], weights)) < 1e-6


@pytest.mark.parametrize("precondition", [True, False])
def test_a_starting_point_changes_the_initial_residual_not_the_solution(precondition):
    a_factors, g_factors, rhs, weights = random_system(5, 4, 3, seed=11)
    expected = dense_solve(a_factors, g_factors, rhs, weights)
    x0 = expected + 0.01 * randn(5, 4, seed=12)
    x, report = kron_cg(a_factors, g_factors, rhs, weights=weights, x0=x0, precondition=precondition, tol=1e-12,
                        max_iters=200)
    dense_residual = rhs.reshape(-1) - dense_operator(a_factors, g_factors, weights) @ x0.reshape(-1)
    assert float(report.initial_residual) == pytest.approx(float(dense_residual.norm() / rhs.norm()), rel=1e-10)
    assert relative_error(x, expected) < 1e-6


@pytest.mark.parametrize("scales", [(1.0, 1.0, 1.0), (1e-3, 1.0, 1e3)])
def test_shared_factors_make_the_preconditioner_exact(scales):
    """A_i = c_i A, G_i = G / c_i (the scale split is arbitrary) with different model scales: P = M."""
    a, g = random_spd(7, 7, seed=13), random_spd(5, 5, seed=14)
    a_factors = [c * a for c in scales]
    g_factors = [m * g / c for m, c in zip((1.0, 3.0, 0.5), scales)]
    rhs, weights = randn(5, 7, seed=15), [0.2, 1.0, 2.5]
    x, report = kron_cg(a_factors, g_factors, rhs, weights=weights, tol=1e-10)
    assert report.iterations <= 2
    assert relative_error(x, dense_solve(a_factors, g_factors, rhs, weights)) < 1e-8


@pytest.mark.parametrize("precondition", [True, False])
def test_identity_precision_gives_the_weighted_average(precondition):
    models, weights = [randn(3, 4, seed=20 + i) for i in range(3)], [0.5, 1.0, 2.5]
    eye_in, eye_out = torch.eye(4, dtype=F64), torch.eye(3, dtype=F64)
    rhs = sum(w * m for w, m in zip(weights, models))
    x, report = kron_cg([eye_in] * 3, [eye_out] * 3, rhs, weights=weights, precondition=precondition)
    assert torch.allclose(x, (0.5 * models[0] + models[1] + 2.5 * models[2]) / 4.0, rtol=1e-12, atol=1e-12)
    assert report.iterations == 1


def test_a_zero_right_hand_side_returns_the_starting_point_or_zeros():
    a_factors, g_factors, _, weights = random_system(3, 4, 2, seed=21)
    zero = torch.zeros(3, 4, dtype=F64)
    x, report = kron_cg(a_factors, g_factors, zero, weights=weights)
    assert torch.equal(x, zero) and report.iterations == 0 and float(report.final_residual) == 0
    # x0 solves M X = 0 when M is zero on it (no model has curvature there): returned as is
    x0 = randn(3, 4, seed=22)
    zero_a = [torch.zeros(4, 4, dtype=F64)] * 2
    x, report = kron_cg(zero_a, g_factors, zero, x0=x0)
    assert torch.equal(x, x0) and bool(report.converged) and report.iterations == 0


def test_a_zero_right_hand_side_from_a_nonzero_start_converges_to_zero():
    a_factors, g_factors, _, weights = random_system(3, 4, 2, seed=23)
    x, report = kron_cg(a_factors, g_factors, torch.zeros(3, 4, dtype=F64), x0=randn(3, 4, seed=24), tol=1e-12,
                        max_iters=200)
    assert float(x.abs().max()) < 1e-10 and float(report.initial_residual) == 1.0


def test_zero_iterations_return_the_starting_point_and_its_residual():
    a_factors, g_factors, rhs, weights = random_system(3, 4, 2, seed=25)
    x0 = randn(3, 4, seed=26)
    history: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, report = kron_cg(a_factors, g_factors, rhs, x0=x0, max_iters=0, residual_history=history)
    assert torch.equal(x, x0) and report.iterations == 0 and history == []
    assert torch.equal(report.initial_residual, report.final_residual) and not bool(report.converged)


def test_stopping_short_warns_and_reports_it():
    a_factors, g_factors, rhs, weights = random_system(5, 6, 3, seed=27)
    history: list = []
    with pytest.warns(SolveWarning, match=r"'layer\.0'.*stopped after 2 iterations"):
        _, report = kron_cg(a_factors, g_factors, rhs, weights=weights, max_iters=2, precondition=False,
                            residual_history=history, name="layer.0")
    assert report.iterations == 2 and len(history) == 2 and not bool(report.converged)
    assert float(history[-1]) == pytest.approx(float(report.final_residual), rel=1e-8)


def test_singular_factors_warn_and_leave_the_unconstrained_column_at_x0():
    """Input feature 2 is always zero, so column 2 of X is unconstrained: CG keeps x0's column there."""
    a_factors, g_factors, _, weights = random_system(4, 5, 3, seed=28)
    mask = torch.ones(5, dtype=F64)
    mask[2] = 0
    a_factors = [a * mask[:, None] * mask[None, :] for a in a_factors]
    models = [randn(4, 5, seed=30 + i) for i in range(3)]
    rhs = sum(w * g @ m @ a for a, g, m, w in zip(a_factors, g_factors, models, weights))
    x0 = sum(models) / 3
    with pytest.warns(SolveWarning, match="singular"):
        x, report = kron_cg(a_factors, g_factors, rhs, weights=weights, x0=x0, tol=1e-10, max_iters=100)
    assert bool(report.converged)
    assert torch.allclose(x[:, 2], x0[:, 2], rtol=1e-8, atol=1e-8)
    keep = [0, 1, 3, 4]
    reduced = dense_solve([a[keep][:, keep] for a in a_factors], g_factors, rhs[:, keep], weights)
    assert relative_error(x[:, keep], reduced) < 1e-6


def test_float32_inputs_come_back_float32_and_accurate():
    a_factors, g_factors, rhs, weights = random_system(5, 7, 3, seed=32)
    x, _ = kron_cg([a.float() for a in a_factors], [g.float() for g in g_factors], rhs.float(), weights=weights,
                   tol=1e-10, max_iters=200)
    assert x.dtype == torch.float32
    assert relative_error(x.double(), dense_solve(a_factors, g_factors, rhs, weights)) < 1e-5


def test_kron_cg_does_not_modify_its_inputs():
    a_factors, g_factors, rhs, weights = random_system(3, 4, 2, seed=33)
    x0 = randn(3, 4, seed=34)
    copies = [t.clone() for t in (*a_factors, *g_factors, rhs, x0)]
    kron_cg(a_factors, g_factors, rhs, weights=weights, x0=x0)
    assert all(torch.equal(t, c) for t, c in zip((*a_factors, *g_factors, rhs, x0), copies))


@pytest.mark.parametrize("change, message", [
    (lambda a, g, r, w: (a, g[:1], r, w), "one A and one G factor per model"),
    (lambda a, g, r, w: (a, g, r, w[:1]), "1 weights for 2 models"),
    (lambda a, g, r, w: (a, g, r, [1.0, -1.0]), "weights must be finite, >= 0"),
    (lambda a, g, r, w: (a, g, r, [0.0, 0.0]), "not all 0"),
    (lambda a, g, r, w: (a, g, r.mT, w), r"Shape mismatch.*A factor 0 has \(4, 4\), expected \(\.\.\., 3, 3\)"),
    (lambda a, g, r, w: (a, g, r[0], w), r"rhs must be \(\.\.\., out, in\)"),
])
def test_kron_cg_rejects_bad_input_with_a_clear_message(change, message):
    a_factors, g_factors, rhs, weights = random_system(3, 4, 2, seed=35)
    a_factors, g_factors, rhs, weights = change(a_factors, g_factors, rhs, weights)
    with pytest.raises(ValueError, match=message):
        kron_cg(a_factors, g_factors, rhs, weights=weights)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 4), inp=st.integers(1, 4), n_models=st.integers(1, 3), seed=st.integers(0, 10_000),
       precondition=st.booleans())
def test_kron_cg_matches_dense_solves_for_any_small_shape(out, inp, n_models, seed, precondition):
    a_factors, g_factors, rhs, weights = random_system(out, inp, n_models, seed=seed)
    x, _ = kron_cg(a_factors, g_factors, rhs, weights=weights, precondition=precondition, tol=1e-12, max_iters=100)
    assert relative_error(x, dense_solve(a_factors, g_factors, rhs, weights)) < 1e-6


# ---------------------------------------------------------------------- solve_gram


@pytest.mark.parametrize("columns", [(3,), ()])
def test_solve_gram_equals_a_dense_solve(columns):
    gram, rhs = random_spd(6, 6, seed=40), randn(6, *columns, seed=41)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a positive definite Gram needs no jitter
        x = solve_gram(gram, rhs)
    assert x.shape == rhs.shape
    assert torch.allclose(x, torch.linalg.solve(gram, rhs), rtol=1e-10, atol=1e-12)


def test_a_singular_gram_warns_and_satisfies_the_equations_on_its_range():
    """Feature 1 of the layer input is always zero: its row and column of the Gram are zero."""
    inputs = randn(20, 5, seed=42)
    inputs[:, 1] = 0
    gram = inputs.T @ inputs / 20
    rhs = gram @ randn(5, 3, seed=43)  # Σ_i G_i W_i: zero in row 1 too
    with pytest.warns(SolveWarning, match=r"'layer\.q'.*singular: added 1e-\d+·mean\(diag\).*alpha < 1"):
        x = solve_gram(gram, rhs, name="layer.q")
    assert bool(torch.isfinite(x).all())
    assert torch.allclose(gram @ x, rhs, rtol=1e-6, atol=1e-8)
    keep = [0, 2, 3, 4]
    assert torch.allclose(x[keep], torch.linalg.solve(gram[keep][:, keep], rhs[keep]), rtol=1e-6, atol=1e-8)
    assert float(x[1].abs().max()) == 0


def test_solve_gram_computes_float32_input_in_float64():
    inputs = randn(50, 6, seed=44) * torch.logspace(0, -3, 6, dtype=F64)  # condition number ~1e6
    gram, rhs = inputs.T @ inputs, randn(6, 2, seed=45)
    x = solve_gram(gram.float(), rhs.float())
    expected = torch.linalg.solve(gram.float().double(), rhs.float().double())
    assert x.dtype == torch.float32
    assert relative_error(x.double(), expected) < 1e-6


def test_an_all_zero_gram_with_zero_rhs_gives_zeros():
    with pytest.warns(SolveWarning):
        x = solve_gram(torch.zeros(3, 3, dtype=F64), torch.zeros(3, 2, dtype=F64))
    assert torch.equal(x, torch.zeros(3, 2, dtype=F64))


@pytest.mark.parametrize("gram, rhs, error, message", [
    # broken statistics are the user's to fix (one line in the CLI); a wrong shape is the caller's bug
    (-torch.eye(3, dtype=F64), torch.ones(3, 1, dtype=F64), StatisticsError, "not positive semi-definite"),
    (torch.full((3, 3), float("nan"), dtype=F64), torch.ones(3, 1, dtype=F64), StatisticsError, "NaN/inf"),
    (torch.eye(3, dtype=F64), torch.ones(4, 1, dtype=F64), ValueError, r"Shape mismatch.*\(3, 3\).*got \(4, 1\)"),
    (torch.ones(3, 2, dtype=F64), torch.ones(3, 1, dtype=F64), ValueError, r"must be square"),
])
def test_solve_gram_rejects_bad_input(gram, rhs, error, message):
    with pytest.raises(error, match=message):
        solve_gram(gram, rhs, name="layer.q")


def test_solve_gram_does_not_modify_its_inputs():
    gram, rhs = random_spd(4, 4, seed=46), randn(4, 2, seed=47)
    copies = gram.clone(), rhs.clone()
    solve_gram(gram, rhs)
    assert torch.equal(gram, copies[0]) and torch.equal(rhs, copies[1])


# ---------------------------------------------------------------------- solve_diagonal


def test_solve_diagonal_divides_and_takes_the_fallback_where_no_model_cares():
    precision = torch.tensor([2.0, 0.0, 4.0, 0.0], dtype=F64)
    rhs = torch.tensor([1.0, 0.0, -2.0, 0.0], dtype=F64)
    fallback = torch.tensor([9.0, 7.0, 9.0, -3.0], dtype=F64)
    assert solve_diagonal(precision, rhs, fallback).tolist() == [0.5, 7.0, -0.5, -3.0]
    assert solve_diagonal(precision, rhs).tolist() == [0.5, 0.0, -0.5, 0.0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 1e-30, 0.5, 3.0, 1e30]), st.integers(-1000, 1000)), min_size=1,
                max_size=12))
def test_solve_diagonal_never_makes_nan(entries):
    precision = torch.tensor([p for p, _ in entries], dtype=F64)
    rhs = torch.tensor([r for _, r in entries], dtype=F64) * (precision != 0)  # Σ w_i c_i θ_i is 0 where c is
    x = solve_diagonal(precision, rhs, torch.full_like(rhs, 5.0))
    assert not bool(x.isnan().any())
    cares = precision != 0
    assert torch.equal(x[~cares], torch.full_like(x[~cares], 5.0))
    assert torch.allclose(x[cares] * precision[cares], rhs[cares], rtol=1e-12, atol=0)


def test_solve_diagonal_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"Shape mismatch: fallback has \(3,\), rhs has \(2,\)"):
        solve_diagonal(torch.ones(2), torch.ones(2), torch.ones(3))
