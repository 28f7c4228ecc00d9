"""Subspace merges (TSV, Iso-C, Iso-CTS, WUDI) against the papers' formulas written out here: independent
loops over the tasks, LAPACK's SVD in float64 (the implementation decomposes Gram matrices instead), autograd
for WUDI's objective, and the limits each formula must reach."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mergesmith import merge
from mergesmith.methods import merge_tensors
from mergesmith.methods.subspace import gram_svd, iso_cts_split, polar, wudi_adam, wudi_exact

F64 = torch.float64


def _case(t: int = 3, rows: int = 12, cols: int = 9, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=generator, dtype=F64)
    return base, [base + 0.1 * torch.randn(rows, cols, generator=generator, dtype=F64) for _ in range(t)]


def _polar_by_svd(x: torch.Tensor) -> torch.Tensor:
    """U Vᵀ from x = U S Vᵀ, x of full rank: x's orthogonal polar factor, by LAPACK's SVD."""
    u, _, vt = torch.linalg.svd(x, full_matrices=False)
    return u @ vt


def _merge(method: str, base, tensors, **parameters):
    with torch.inference_mode():  # as the engine calls them
        return merge_tensors(method, base, tensors, **parameters)


# ---- TSV ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 40, 12), (2, 12, 40), (30, 30)])
def test_singular_triplets_from_the_gram_are_lapacks(shape):
    x = torch.randn(*shape, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    u, s, vt = torch.linalg.svd(x.double(), full_matrices=False)
    gu, gs, gvt = gram_svd(x, 5)
    assert gu.dtype == torch.float32 and gu.shape == (*shape[:-1], 5) and gvt.shape == (*shape[:-2], 5, shape[-1])
    torch.testing.assert_close(gs.double(), s[..., :5], rtol=1e-6, atol=0)
    # vectors are defined up to sign: compare the rank-5 reconstructions and the projectors
    torch.testing.assert_close((gu * gs.unsqueeze(-2) @ gvt).double(), u[..., :5] * s[..., None, :5] @ vt[..., :5, :],
                               rtol=0, atol=2e-5)
    torch.testing.assert_close((gu.mT @ gu).double(), torch.eye(5, dtype=F64).expand(*shape[:-2], 5, 5), atol=1e-5,
                               rtol=0)


def test_a_rank_deficient_matrix_has_zero_triplets_past_its_rank():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(20, 3, generator=generator) @ torch.randn(3, 16, generator=generator)  # rank 3, float32
    u, s, vt = gram_svd(x)
    assert int((s > 0).sum()) == 3 and not bool(u[:, 3:].any()) and not bool(vt[3:].any())
    torch.testing.assert_close(u * s @ vt, x, rtol=0, atol=1e-5)
    p = polar(x)  # the partial isometry on x's range
    torch.testing.assert_close(p @ p.T @ p, p, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.linalg.svdvals(p)[:4], torch.tensor([1.0, 1.0, 1.0, 0.0]), rtol=0, atol=1e-5)


def test_an_ill_conditioned_polar_factor_keeps_its_digits():
    # σ from 1 down to 6e-6, as a TSV V_cat of MiniLM had: the Gram alone would be off by ~1e-3 on the weakest
    generator = torch.Generator().manual_seed(4)
    q1 = torch.linalg.qr(torch.randn(60, 40, generator=generator, dtype=F64))[0]
    q2 = torch.linalg.qr(torch.randn(40, 40, generator=generator, dtype=F64))[0]
    x = (q1 * torch.logspace(0, -5.2, 40, dtype=F64)) @ q2.T
    torch.testing.assert_close(polar(x.float()).double(), q1 @ q2.T, rtol=0, atol=1e-4)
    torch.testing.assert_close(polar(x), q1 @ q2.T, rtol=0, atol=1e-9)


def test_iso_cts_with_rank_deficient_task_matrices_is_finite_and_the_papers():
    # the shape that made LAPACK's SVD fail to converge: Δ_i − U_c U_cᵀ Δ_i has rank r − k_common, here with
    # bf16-rounded inputs as a real checkpoint holds them
    generator = torch.Generator().manual_seed(3)
    base = (torch.randn(64, 48, generator=generator) * 0.02).bfloat16().float()
    tensors = [(base + torch.randn(64, 48, generator=generator) * 0.001).bfloat16().float() for _ in range(3)]
    got = _merge("iso_cts", base, tensors)
    assert bool(torch.isfinite(got).all())
    expected = _iso_cts_by_loop(base.double(), [t.double() for t in tensors], 0.8)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)


def test_tsv_is_the_papers_construction():
    base, tensors = _case(t=3, rows=12, cols=9)
    k = 9 // 3
    u_parts, s_parts, v_parts = [], [], []
    for tensor in tensors:
        u, s, vt = torch.linalg.svd(tensor - base)
        u_parts.append(u[:, :k])
        s_parts.append(s[:k])
        v_parts.append(vt[:k].T)
    u_perp = _polar_by_svd(torch.cat(u_parts, 1))
    v_perp = _polar_by_svd(torch.cat(v_parts, 1))
    expected = base + 0.7 * u_perp @ torch.diag(torch.cat(s_parts)) @ v_perp.T
    torch.testing.assert_close(_merge("tsv", base, tensors, alpha=0.7), expected, rtol=1e-9, atol=1e-10)


def test_tsv_factors_are_orthonormal_and_one_task_at_full_rank_is_its_task_vector():
    x = torch.randn(10, 4, dtype=F64)
    p = polar(x)
    torch.testing.assert_close(p.T @ p, torch.eye(4, dtype=F64))
    base, tensors = _case(t=1)
    torch.testing.assert_close(_merge("tsv", base, tensors), tensors[0], rtol=1e-10, atol=1e-10)


def test_tsv_keeps_tasks_in_disjoint_subspaces_whole():
    # task vectors on disjoint row and column blocks, each of rank ≤ ⌊r/T⌋: TSV changes nothing, it is the sum
    base = torch.zeros(8, 8, dtype=F64)
    a, b = torch.zeros(8, 8, dtype=F64), torch.zeros(8, 8, dtype=F64)
    a[:4, :4] = torch.randn(4, 2, dtype=F64) @ torch.randn(2, 4, dtype=F64)
    b[4:, 4:] = torch.randn(4, 2, dtype=F64) @ torch.randn(2, 4, dtype=F64)
    torch.testing.assert_close(_merge("tsv", base, [a, b]), a + b, rtol=1e-9, atol=1e-10)


def test_identical_low_rank_models_merge_to_themselves_with_tsv_and_wudi():
    base = torch.randn(9, 9, dtype=F64)
    delta = torch.randn(9, 2, dtype=F64) @ torch.randn(2, 9, dtype=F64)  # rank 2 ≤ ⌊9/3⌋
    tensors = [base + delta] * 3
    torch.testing.assert_close(_merge("tsv", base, tensors), base + delta, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(_merge("wudi", base, tensors), base + delta, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "wudi"])
def test_fine_tunes_equal_to_the_base_merge_to_the_base(method):
    base = torch.randn(6, 5)
    torch.testing.assert_close(_merge(method, base, [base.clone(), base.clone()]), base)


@pytest.mark.parametrize("method,extra", [("tsv", {}), ("iso_c", {}), ("iso_cts", {}), ("wudi", {}),
                                          ("wudi", {"solver": "adam"})])
def test_other_tensors_take_the_scaled_mean_task_vector(method, extra):
    base = torch.randn(7, dtype=F64)
    tensors = [base + torch.randn(7, dtype=F64) for _ in range(3)]
    expected = base + 0.6 * sum(t - base for t in tensors) / 3
    torch.testing.assert_close(_merge(method, base, tensors, alpha=0.6, **extra), expected)
    kernel = torch.randn(4, 1, 3, 3, dtype=F64)  # a convolution is not a 2-D weight either
    others = [kernel + torch.randn_like(kernel) for _ in range(2)]
    torch.testing.assert_close(_merge(method, kernel, others, alpha=0.6, **extra),
                               kernel + 0.6 * (others[0] + others[1] - 2 * kernel) / 2)


# ---- Iso-C and Iso-CTS --------------------------------------------------------------------------------

def test_iso_c_flattens_the_spectrum_of_the_sum_to_its_mean():
    base, tensors = _case(t=4)
    total = sum(t - base for t in tensors)
    merged = _merge("iso_c", base, tensors, alpha=1.3) - base
    mean = torch.linalg.svdvals(total).mean()
    torch.testing.assert_close(torch.linalg.svdvals(merged), torch.full((9,), 1.3 * float(mean), dtype=F64))
    # and the directions are the sum's: merged = 1.3·mean·U Vᵀ, so merged·Vᵀ's SVD shares U
    u, _, vt = torch.linalg.svd(total, full_matrices=False)
    torch.testing.assert_close(merged, 1.3 * mean * u @ vt)


def _iso_cts_by_loop(base, tensors, fraction):
    t = len(tensors)
    deltas = [x - base for x in tensors]
    r = min(base.shape)
    common = int(r * fraction)
    per_task = round((r - common) / t)
    common = r - per_task * t
    u, s, vt = torch.linalg.svd(sum(deltas), full_matrices=False)
    columns, rows, values = [u[:, :common]], [vt[:common]], [s[:common]]
    projector = torch.eye(base.shape[0], dtype=F64) - u[:, :common] @ u[:, :common].T
    for delta in deltas:
        ut, st, vtt = torch.linalg.svd(projector @ delta, full_matrices=False)
        columns.append(ut[:, :per_task])
        rows.append(vtt[:per_task])
        values.append(st[:per_task])
    u_perp = _polar_by_svd(torch.cat(columns, 1))
    v_perp = _polar_by_svd(torch.cat(rows, 0).T)
    return base + torch.cat(values).mean() * u_perp @ v_perp.T


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_is_the_papers_construction(fraction):
    base, tensors = _case(t=3, rows=14, cols=12)
    got = _merge("iso_cts", base, tensors, common_space_fraction=fraction)
    torch.testing.assert_close(got, _iso_cts_by_loop(base, tensors, fraction), rtol=1e-8, atol=1e-9)
    values = torch.linalg.svdvals(got - base)
    torch.testing.assert_close(values, values[:1].expand(12))  # isotropic


def test_iso_cts_split_and_its_iso_c_limit():
    assert iso_cts_split(768, 8, 0.8) == (616, 19)  # ⌊614.4⌋ = 614, (768 − 614)/8 = 19.25 → 19, 768 − 152
    assert iso_cts_split(12, 3, 0.8) == (12 - 3, 1)
    assert iso_cts_split(2, 6, 0.8) == (2, 0)  # no room for task directions
    base, tensors = _case(t=3)
    torch.testing.assert_close(_merge("iso_cts", base, tensors, common_space_fraction=1.0),
                               _merge("iso_c", base, tensors))


# ---- WUDI ---------------------------------------------------------------------------------------------

def _wudi_loss(tau, deltas):
    return sum(((tau - d) @ d.T).pow(2).sum() / d.pow(2).sum() for d in deltas)


def test_wudi_exact_zeroes_the_gradient_of_its_objective():
    base, tensors = _case(t=4, rows=10, cols=16)
    tau = (_merge("wudi", base, tensors) - base).clone().requires_grad_(True)
    loss = _wudi_loss(tau, [t - base for t in tensors])
    (gradient,) = torch.autograd.grad(loss, tau)
    assert float(gradient.abs().max()) < 1e-10 * float(loss.detach())
    # and it is a minimum: any step raises the loss (the objective is a convex quadratic)
    for _ in range(3):
        step = 1e-3 * torch.randn_like(tau)
        assert float(_wudi_loss(tau.detach() + step, [t - base for t in tensors])) > float(loss.detach())


def test_wudi_exact_with_a_singular_system_is_the_minimum_norm_solution():
    # two 2-row task vectors of a 10-wide layer: Σ G_i has rank 4, so the minimiser is a subspace
    base, tensors = _case(t=2, rows=2, cols=10)
    deltas = torch.stack([t - base for t in tensors])
    tau = wudi_exact(deltas)
    grams = [d.T @ d / d.pow(2).sum() for d in deltas]
    expected = (sum(d @ g for d, g in zip(deltas, grams)) @ torch.linalg.pinv(sum(grams), hermitian=True))
    torch.testing.assert_close(tau, expected, rtol=1e-8, atol=1e-10)


def test_wudi_adam_follows_the_papers_descent():
    base, tensors = _case(t=3, rows=8, cols=6)
    deltas = [t - base for t in tensors]
    tau = sum(deltas).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([tau], lr=1e-3, weight_decay=0)
    for _ in range(40):
        optimizer.zero_grad()
        _wudi_loss(tau, deltas).backward()
        optimizer.step()
    got = _merge("wudi", base, tensors, solver="adam", iterations=40, lr=1e-3) - base
    torch.testing.assert_close(got, tau.detach(), rtol=1e-9, atol=1e-12)
    # the paper's default schedule (300 steps at 1e-5) stays near its start, Σ Δ_i
    default = wudi_adam(torch.stack(deltas), iterations=300, lr=1e-5)
    assert float((default - sum(deltas)).abs().max()) <= 300 * 1e-5 * 1.01


# ---- through the engine -------------------------------------------------------------------------------

@pytest.mark.parametrize("method,parameters", [("tsv", {"alpha": 0.5}), ("iso_c", {}),
                                               ("iso_cts", {"common_space_fraction": 0.6}),
                                               ("wudi", {"solver": "exact"})])
def test_a_checkpoint_merge_is_the_tensor_formula(llama, write_recipe, tmp_path, method, parameters):
    recipe = {"merge_method": method, "base_model": str(llama["base"]), "parameters": parameters,
              "dtype": "float32", "models": [{"model": str(llama[m])} for m in ("ft1", "ft2", "ft3")]}
    merge(write_recipe(recipe), tmp_path / "out")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    inputs = {m: load_file(str(llama[m] / "model.safetensors")) for m in ("base", "ft1", "ft2", "ft3")}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"):
        expected = _merge(method, inputs["base"][name].double(),
                          [inputs[m][name].double() for m in ("ft1", "ft2", "ft3")], **parameters)
        torch.testing.assert_close(written[name].double(), expected, rtol=1e-4, atol=1e-5, msg=name)
