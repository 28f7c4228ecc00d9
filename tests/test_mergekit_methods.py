"""mergekit's remaining methods against their definitions, written out entry by entry: DELLA (its limits and
its drop rates), SCE, RAM, RAM+, Arcee Fusion, NearSwap, Multi-SLERP and the Karcher mean. Tensor parity
with mergekit 0.1.5 itself is in tests/test_mergekit_parity.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mergesmith.errors import RecipeError
from mergesmith.methods import merge_tensors
from mergesmith.methods.geometric import slerp_vectors
from mergesmith.methods.sparsify import della_keep_probabilities

F64 = torch.float64


def _case(t: int = 3, shape=(6, 5), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=F64)
    return base, [base + 0.1 * torch.randn(shape, generator=generator, dtype=F64) for _ in range(t)]


def _seeded(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _per_model(n: int, **values) -> list[dict]:
    return [dict(values) for _ in range(n)]


# ---- DELLA --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("della,dare", [("della", "dare_ties"), ("della_linear", "dare_linear")])
def test_della_with_zero_spread_is_dare_with_the_same_mask(della, dare):
    base, tensors = _case(shape=(40, 30))
    ours = merge_tensors(della, base, tensors, generator=_seeded(), model_parameters=_per_model(
        3, density=0.4, epsilon=0.0), **{"lambda": 0.7})
    theirs = merge_tensors(dare, base, tensors, generator=_seeded(), model_parameters=_per_model(3, density=0.4),
                           normalize=della == "della", **{"lambda": 0.7})
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


def test_della_at_density_one_is_ties_and_della_linear_task_arithmetic():
    base, tensors = _case()
    torch.testing.assert_close(merge_tensors("della", base, tensors, generator=_seeded()),
                               merge_tensors("ties", base, tensors))
    torch.testing.assert_close(merge_tensors("della_linear", base, tensors, generator=_seeded(), **{"lambda": 0.5}),
                               merge_tensors("task_arithmetic", base, tensors, **{"lambda": 0.5}))


def test_della_keep_probabilities_rise_linearly_with_the_magnitude_rank_in_each_row():
    delta = torch.tensor([[0.3, -2.0, 0.1, 1.0, -0.5], [5.0, 4.0, 3.0, 2.0, 1.0]], dtype=F64)
    p = della_keep_probabilities(delta, 0.5, 0.2)
    # ranks by |value| per row: row 0 → 1, 4, 0, 3, 2; row 1 → 4, 3, 2, 1, 0; p = 0.3 + 0.4·rank/4
    expected = [[0.3 + 0.1 * r for r in (1, 4, 0, 3, 2)], [0.3 + 0.1 * r for r in (4, 3, 2, 1, 0)]]
    torch.testing.assert_close(p, torch.tensor(expected, dtype=F64))
    assert float(della_keep_probabilities(torch.tensor([2.0]), 0.4, 0.1)) == pytest.approx(0.4)


def test_della_drop_rates_and_its_rescale_are_as_the_paper_says():
    # one row of 20 000 entries with distinct magnitudes: entry j (ascending) is kept with p_j = 0.2 + 0.4·j/(n−1)
    n, density, epsilon = 20_000, 0.4, 0.2
    base = torch.zeros(1, n, dtype=F64)
    delta = torch.linspace(0.01, 1.0, n, dtype=F64).reshape(1, n)
    merged = merge_tensors("della_linear", base, [base + delta], generator=_seeded(3),
                           model_parameters=[{"density": density, "epsilon": epsilon}])
    kept = merged != 0
    p = density - epsilon + 2 * epsilon * torch.arange(n, dtype=F64) / (n - 1)
    for part in torch.arange(n).chunk(5):  # by magnitude quintile: the mean keep rate within 5 standard errors
        expected, count = float(p[part].mean()), len(part)
        observed = float(kept[0, part].double().mean())
        assert abs(observed - expected) < 5 * math.sqrt(expected * (1 - expected) / count), (part[0], observed)
    # survivors are divided by their own probability (unbiased: E[kept/p] = τ)
    torch.testing.assert_close(merged[kept], (delta / p)[kept])


def test_della_refuses_probabilities_outside_zero_one():
    base, tensors = _case()
    with pytest.raises(RecipeError, match=r"density ± epsilon \(0.9 ± 0.15\) must lie in \[0, 1\]"):
        merge_tensors("della", base, tensors, generator=_seeded(), model_parameters=_per_model(3, density=0.9))


# ---- SCE ----------------------------------------------------------------------------------------------

def _sce_by_entry(base, tensors, select_topk):
    deltas = torch.stack([t - base for t in tensors])
    flat = deltas.reshape(len(tensors), -1)
    if select_topk < 1:
        variance = [float(flat[:, j].var(unbiased=False)) for j in range(flat.shape[1])]
        k = int(sum(v != 0 for v in variance) * select_topk)
        order = sorted(range(len(variance)), key=lambda j: (-variance[j], j))
        keep = set(order[:k])
        flat = torch.stack([flat[:, j] if j in keep else torch.zeros(len(tensors), dtype=F64)
                            for j in range(flat.shape[1])], 1)
    energy = [float((row ** 2).mean()) for row in flat]
    weights = [e / sum(energy) for e in energy]
    out = []
    for j in range(flat.shape[1]):
        sign = 1.0 if float(flat[:, j].sum()) >= 0 else -1.0
        agree = [i for i in range(len(tensors)) if float(flat[i, j]) * sign > 0]
        numerator = sum(weights[i] * float(flat[i, j]) for i in agree)
        out.append(numerator / max(sum(weights[i] for i in agree), 1e-6))
    return base + torch.tensor(out, dtype=F64).reshape(base.shape)


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_entry_by_entry(select_topk):
    base, tensors = _case(t=4)
    torch.testing.assert_close(merge_tensors("sce", base, tensors, select_topk=select_topk),
                               _sce_by_entry(base, tensors, select_topk))


# ---- RAM and RAM+ -------------------------------------------------------------------------------------

def _sparse_case():
    # task vectors with exact zeros, so that entries are changed by one model, by several, or by none
    base, tensors = _case(t=3, shape=(8, 6), seed=2)
    generator = torch.Generator().manual_seed(5)
    return base, [base + (t - base) * (torch.rand(base.shape, generator=generator) < 0.4) for t in tensors]


def test_ram_entry_by_entry():
    base, tensors = _sparse_case()
    deltas = [t - base for t in tensors]
    expected = base.clone()
    for index in itertools.product(*map(range, base.shape)):
        changed = [float(d[index]) for d in deltas if abs(float(d[index])) > 1e-5]
        expected[index] += sum(changed) / max(len(changed), 1)
    torch.testing.assert_close(merge_tensors("ram", base, tensors), expected)


def test_ramplus_boosts_each_models_unique_entries_by_its_shared_to_unique_ratio():
    base, tensors = _sparse_case()
    deltas = [t - base for t in tensors]
    changed = [d.abs() > 1e-5 for d in deltas]
    counts = sum(c.long() for c in changed)
    expected = base.clone()
    for i, d in enumerate(deltas):
        unique = int((changed[i] & (counts == 1)).sum())
        shared = int((changed[i] & (counts > 1)).sum())
        boost = 1 + 0.5 * min(max(shared / max(unique, 1e-5), 0), 0.3)
        for index in itertools.product(*map(range, base.shape)):
            if changed[i][index]:
                expected[index] += float(d[index]) * (boost if counts[index] == 1 else 1 / int(counts[index]))
    torch.testing.assert_close(merge_tensors("ramplus_tl", base, tensors, r=0.5, alpha=0.3), expected)


# ---- Arcee Fusion and NearSwap ------------------------------------------------------------------------

def test_arcee_fusion_keeps_the_changes_above_its_outlier_threshold():
    base, (other,) = _case(t=1, shape=(20, 16))
    other = other + torch.where(torch.rand(base.shape, generator=_seeded(1)) < 0.1, 2.0, 0.0)
    p = torch.softmax(other, -1) + 1e-8
    q = torch.softmax(base, -1) + 1e-8
    importance = [[abs(float(other[r, c] - base[r, c])) * float((p[r] * (p[r] / q[r]).log()).sum())
                   for c in range(16)] for r in range(20)]
    ordered = sorted(v for row in importance for v in row)
    q1, median, q3 = (ordered[int(f * (len(ordered) - 1))] for f in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    expected = torch.tensor([[float(other[r, c]) if importance[r][c] >= threshold else float(base[r, c])
                              for c in range(16)] for r in range(20)], dtype=F64)
    got = merge_tensors("arcee_fusion", base, [other])
    torch.testing.assert_close(got, expected)
    assert 0 < int((got != base).sum()) < base.numel()  # the threshold selects: neither all nor nothing


def test_nearswap_entry_by_entry():
    base, (other,) = _case(t=1)
    t = 0.05
    expected = base.clone()
    for index in itertools.product(*map(range, base.shape)):
        a, b = float(base[index]), float(other[index])
        w = min(max(t / max(abs(a - b), 1e-6), 0.0), 1.0)
        expected[index] = w * b + (1 - w) * a
    torch.testing.assert_close(merge_tensors("nearswap", base, [other], t=t), expected)
    torch.testing.assert_close(merge_tensors("nearswap", base, [other], t=0.0), base)


# ---- Multi-SLERP and Karcher --------------------------------------------------------------------------

def test_karcher_of_two_is_the_geodesic_midpoint_times_the_mean_norm():
    a = torch.tensor([3.0, 0.0, 0.0], dtype=F64)
    b = torch.tensor([0.0, 1.0, 1.0], dtype=F64)
    midpoint = slerp_vectors(0.5, a / a.norm(), b / b.norm())
    expected = (a.norm() + b.norm()) / 2 * midpoint / midpoint.norm()
    torch.testing.assert_close(merge_tensors("karcher", None, [a, b], max_iter=50, tol=1e-12), expected)


def test_karcher_of_orthonormal_vectors_is_their_symmetric_direction_and_counts_the_base():
    e = torch.eye(3, dtype=F64)
    expected = torch.ones(3, dtype=F64) / math.sqrt(3)
    torch.testing.assert_close(merge_tensors("karcher", e[0], [e[1], e[2]], max_iter=50, tol=1e-12), expected)


def test_multislerp_of_two_symmetric_vectors_is_their_mean_direction():
    a = torch.tensor([2.0, 1.0], dtype=F64)
    b = torch.tensor([1.0, 2.0], dtype=F64)
    got = merge_tensors("multislerp", None, [a, b], eps=1e-12)
    # equal weights and norms: the tangent parts cancel, so the result is the mean direction at the mean norm
    torch.testing.assert_close(got, a.norm() * torch.tensor([1.0, 1.0], dtype=F64) / math.sqrt(2))
    base = torch.tensor([1.0, -1.0], dtype=F64)
    torch.testing.assert_close(merge_tensors("multislerp", base, [a + base, b + base], eps=1e-12), got + base)


def test_multislerp_follows_its_exponential_map_for_unequal_weights():
    generator = _seeded(4)
    vectors = [torch.randn(5, generator=generator, dtype=F64) for _ in range(3)]
    w = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    units = [v / v.norm() for v in vectors]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    angle = tangent.norm()
    direction = math.cos(angle) * mean + math.sin(angle) * tangent / angle
    expected = direction * sum(wi * v.norm() for wi, v in zip(w, vectors))
    got = merge_tensors("multislerp", None, vectors, eps=1e-15,
                        model_parameters=[{"weight": float(x)} for x in (2.0, 5.0, 3.0)])
    torch.testing.assert_close(got, expected)


def test_multislerp_of_inputs_that_cancel_is_one_clear_error():
    a = torch.tensor([1.0, 0.0])
    with pytest.raises(RecipeError, match="weighted sum of the unit inputs is zero"):
        merge_tensors("multislerp", None, [a, -a, torch.tensor([0.0, 0.0])],
                      model_parameters=[{"weight": 1.0}, {"weight": 1.0}, {"weight": 0.0}])


# mergekit 0.1.5's registry (mergekit.merge_methods.registry._METHODS), every name of which a recipe may use
MERGEKIT_0_1_5 = ["arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
                  "della_linear", "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp",
                  "passthrough", "ram", "ramplus_tl", "sce", "slerp", "task_arithmetic", "ties"]


def test_every_mergekit_method_name_is_accepted():
    from mergesmith.methods import method_names

    assert set(MERGEKIT_0_1_5) <= set(method_names())


def test_the_list_is_mergekits_own_when_mergekit_is_installed():
    import os
    import subprocess
    from pathlib import Path

    executable = os.environ.get("MERGEKIT_YAML")
    if not executable:
        pytest.skip("set MERGEKIT_YAML to a mergekit-yaml executable")
    python = Path(executable).with_name("python")
    listed = subprocess.run([str(python), "-c", "import mergekit.merge_methods.registry as r; "
                             "print(' '.join(sorted(r._METHODS)))"], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == MERGEKIT_0_1_5


def test_multislerp_of_unchanged_tensors_is_the_tensor():
    base = torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(merge_tensors("multislerp", base, [base.clone()] * 3), base)
    torch.testing.assert_close(merge_tensors("multislerp", None, [torch.zeros(3)] * 3), torch.zeros(3))
