"""Task-vector sparsifiers and the sign-consensus combine of TIES, DARE and Model Breadcrumbs.

All masks keep exactly the documented number of entries. Magnitudes are ranked by a stable ascending
sort (equal magnitudes by position), so results are deterministic; mergekit's argsort leaves the order of
equal magnitudes unspecified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from mergesmith.lazy import lazy_import

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")

BLOCK = 1 << 18  # entries per step of a fused elementwise loop: its working set stays in cache


def blocks(numel: int) -> Iterator[slice]:
    """Consecutive slices of at most BLOCK entries covering range(numel)."""
    return (slice(start, min(start + BLOCK, numel)) for start in range(0, numel, BLOCK))


def keep_count(numel: int, density: float) -> int:
    """How many entries a magnitude trim keeps: ⌊density·n⌋, but at least one when density > 0."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


_SAMPLE_MIN_N = 1 << 15  # below this, a plain selection is as fast as the sampled one


def select(values: Tensor, rank: int) -> tuple[Tensor, Tensor, int]:
    """The entry v of ``rank`` (0-based) in ascending order of a flat tensor, the positions of every entry
    equal to v (ascending), and how many entries exceed v — in a few linear passes.

    A fixed-seed sample brackets v; an exact selection then runs only on the entries inside the bracket
    (a few percent of them), which also hold all of v's ties. If the bracket misses, a full selection
    runs, so the answer never depends on the sample.
    """
    n = values.numel()
    if n >= _SAMPLE_MIN_N:
        size = min(1 << 14, n // 16)
        generator = torch.Generator(device=values.device).manual_seed(0)
        sample = values[torch.randint(n, (size,), generator=generator, device=values.device)].sort().values
        margin = 2.5 / size**0.5  # 5 standard deviations of a sample quantile, at worst (q = 1/2)
        low = sample[max(0, int((rank / n - margin) * size))]
        high = sample[min(size - 1, int((rank / n + margin) * size))]
        at_least_low = values >= low
        below = n - int(torch.count_nonzero(at_least_low))
        positions = at_least_low.logical_and_(values <= high).nonzero().squeeze(1)
        inside = values[positions]
        if below <= rank < below + inside.numel():
            v = torch.kthvalue(inside, rank - below + 1).values
            greater = n - below - inside.numel() + int(torch.count_nonzero(inside > v))
            return v, positions[inside == v], greater
    v = torch.kthvalue(values, rank + 1).values
    return v, (values == v).nonzero().squeeze(1), int(torch.count_nonzero(values > v))


def rank_range_mask(values: Tensor, start: int, stop: int) -> Tensor:
    """Mask of the entries whose rank in a stable ascending sort of ``values`` lies in [start, stop).

    Equal values are ranked by position, so exactly stop − start entries are kept and the result is
    deterministic. Uses one or two selections (``select``) instead of a sort.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    start, stop = max(0, start), min(n, stop)
    if stop <= start:
        return torch.zeros_like(values, dtype=torch.bool)
    mask = torch.ones(n, dtype=torch.bool, device=flat.device)
    if start > 0:
        low, ties, greater = select(flat, start)
        torch.ge(flat, low, out=mask)
        smaller = n - greater - ties.numel()
        mask[ties[:start - smaller]] = False  # ties ranked below `start`: the earliest
    if stop < n:
        high, ties, greater = select(flat, stop - 1)
        within = flat <= high
        smaller = n - greater - ties.numel()
        within[ties[stop - smaller:]] = False  # ties ranked at or past `stop`: the latest
        mask &= within
    return mask.reshape(values.shape)


def _top_threshold(magnitude: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """For keeping the k largest of a flat tensor (equal values: earlier positions first): the threshold
    v (keep entries ≥ v) and the positions of the ties at v that must go anyway (0 < k < n)."""
    v, ties, greater = select(magnitude, magnitude.numel() - k)
    return v, ties[k - greater:]


def top_k_mask(values: Tensor, k: int) -> Tensor:
    """Mask of the k largest ``values``; among equal values at the threshold the earlier positions are kept
    (a stable sort by descending value)."""
    flat = values.reshape(-1)
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full_like(values, k >= n, dtype=torch.bool)
    threshold, dropped_ties = _top_threshold(flat, k)
    mask = flat >= threshold
    mask[dropped_ties] = False
    return mask.reshape(values.shape)


def top_magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Mask of the ``keep_count`` largest |delta| (TIES trim; ``top_k_mask``)."""
    return top_k_mask(delta.abs(), keep_count(delta.numel(), density))


def top_magnitude_floor_(delta: Tensor, density: float) -> Tensor:
    """The TIES trim of ``top_magnitude_mask``, left lazy: zero in place only the tied entries at the
    threshold that must go, and return the threshold. The trim is complete once entries whose magnitude
    is below it count as zero, which ``consensus_combine`` applies block by block in cache instead of a
    full pass over memory."""
    flat = delta.view(-1)
    n = flat.numel()
    k = keep_count(n, density)
    if k == n or k == 0:
        if k == 0:
            delta.zero_()
        return flat.new_zeros(())
    threshold, dropped_ties = _top_threshold(flat.abs(), k)
    flat[dropped_ties] = 0
    return threshold


def keep_top_magnitude_(delta: Tensor, density: float) -> Tensor:
    """In place: zero all but the entries of ``top_magnitude_mask``."""
    floor = top_magnitude_floor_(delta, density)
    return delta.masked_fill_(delta.abs() < floor, 0)


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs (arXiv:2312.06795): drop the ⌊γn⌋ largest magnitudes as outliers and the smallest
    ones so that ⌊density·n⌋ entries remain (ranks as in ``rank_range_mask``).

    When outliers plus kept entries exceed n, fewer outliers are dropped (the kept count wins), as in
    mergekit 0.1.5. Unlike older mergekit releases, a tensor with fewer than 1/γ elements (no outliers)
    keeps its top ⌊density·n⌋ entries instead of becoming all zeros.
    """
    numel = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    kept = int(density * numel)
    dropped_small = max(0, numel - kept - int(gamma * numel))
    return rank_range_mask(delta.abs(), dropped_small, dropped_small + kept)


def bernoulli_mask(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE's random keep-mask: each entry kept independently with probability ``density``.

    Drawn on the CPU from ``generator`` so that a seed gives the same mask on every device.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    draws = torch.rand(delta.shape, generator=generator, dtype=torch.float32)
    return (draws < density).to(delta.device)


def della_keep_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MAGPRUNE (arXiv:2406.11617): within each row (a 1-D tensor is one row; a wider tensor's rows
    are its first axis), entries ranked by magnitude r = 0 … n−1 (ascending, equal magnitudes by position)
    are kept with probability p = density − ε + 2ε·r/(n − 1): from density − ε for the smallest to
    density + ε for the largest (density itself for a one-entry row)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    ranks = torch.empty_like(rows, dtype=torch.float64 if rows.dtype == torch.float64 else torch.float32)
    order = rows.abs().argsort(dim=1, stable=True)
    positions = torch.arange(n, dtype=ranks.dtype, device=rows.device).expand_as(rows)
    ranks.scatter_(1, order, positions)
    spread = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return (density - epsilon + 2 * epsilon * spread).reshape(delta.shape)


def drop_and_rescale_(delta: Tensor, drop_: Callable[[Tensor], object], density: float, rescale: str) -> Tensor:
    """Zero entries of ``delta`` in place with ``drop_(delta)``, then rescale what survives.

    ``inverse_density``: divide by the keep probability, the DARE paper's unbiased 1/(1−p) rescale.
    ``l1``: match the L1 norm of the undropped delta (mergekit 0.1.5's ``rescale: true``).
    ``none``: no rescale. A zero density or an all-zero result returns zeros, never NaN.
    """
    before = delta.abs().sum() if rescale == "l1" else None
    drop_(delta)
    if rescale == "inverse_density" and density > 0:
        delta.div_(density)
    elif before is not None:
        after = delta.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            delta.mul_(before / after)
    return delta


def outside(mask: Tensor) -> Callable[[Tensor], object]:
    """A ``drop_`` for ``drop_and_rescale_`` that zeroes the entries outside ``mask``."""
    return lambda delta: delta.masked_fill_(~mask, 0)


def consensus_combine(deltas: Tensor, weights: Tensor, *, normalize: bool, floors: Tensor | None = None) -> Tensor:
    """TIES's sign election and disjoint merge of task vectors ``deltas`` (n, *shape), weights (n,).

    With u_i = w_i τ_i: the sign s = sign(Σ_i u_i) is elected per entry (a sum of exactly 0 elects +);
    model i agrees where s·u_i > 0 (a zero entry has no sign and never agrees); the result is
    Σ_agree u_i, divided by Σ_agree w_i when ``normalize`` (1 where no model agrees). Runs in
    cache-sized blocks, and the sums over models are matrix-vector products. ``floors`` (n, 1): entries
    of τ_i with magnitude below floors[i] count as zero.
    """
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)  # (n, entries)
    weight_signs = weights.sign().reshape(n, 1)
    merged = torch.empty(flat.shape[1], dtype=deltas.dtype, device=deltas.device)
    for block in blocks(flat.shape[1]):
        part = flat[:, block]  # (n, block)
        if floors is not None:  # finish lazy trims (top_magnitude_floor_)
            part = torch.where(part.abs() >= floors, part, 0.0)
        elected = torch.where(weights @ part >= 0, 1.0, -1.0).to(part.dtype)
        agrees = ((part * elected) * weight_signs > 0).to(part.dtype)  # sign(w_i τ_i) = s
        total = weights @ (part * agrees)
        if normalize:
            divisor = weights @ agrees
            total.div_(divisor.masked_fill_(divisor == 0, 1.0))
        merged[block] = total
    return merged.reshape(deltas.shape[1:])
