"""Task-vector sparsifiers and the sign-consensus combine of TIES, DARE and Model Breadcrumbs.

All masks keep exactly the documented number of entries. Magnitudes are ranked by a stable ascending
sort (equal magnitudes by position), so results are deterministic; mergekit's argsort leaves the order of
equal magnitudes unspecified.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

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


def kth_smallest(values: Tensor, rank: int) -> Tensor:
    """The exact entry of rank ``rank`` (0-based, ascending) of a flat tensor, in a few linear passes.

    A fixed-seed sample brackets the answer; an exact selection then runs only on the entries inside the
    bracket (a few percent of them). If the bracket misses, a full selection runs, so the answer never
    depends on the sample.
    """
    n = values.numel()
    if n < _SAMPLE_MIN_N:
        return torch.kthvalue(values, rank + 1).values
    size = min(1 << 14, n // 16)
    generator = torch.Generator(device=values.device).manual_seed(0)
    sample = values[torch.randint(n, (size,), generator=generator, device=values.device)].sort().values
    quantile = rank / n
    margin = 2.5 / size**0.5  # 5 standard deviations of a sample quantile, at worst (q = 1/2)
    low = sample[max(0, int((quantile - margin) * size))]
    high = sample[min(size - 1, int((quantile + margin) * size))]
    at_least_low = values >= low
    below = n - int(torch.count_nonzero(at_least_low))
    inside = values[at_least_low.logical_and_(values <= high)]
    if below <= rank < below + inside.numel():
        return torch.kthvalue(inside, rank - below + 1).values
    return torch.kthvalue(values, rank + 1).values


def rank_range_mask(values: Tensor, start: int, stop: int) -> Tensor:
    """Mask of the entries whose rank in a stable ascending sort of ``values`` lies in [start, stop).

    Equal values are ranked by position, so exactly stop − start entries are kept and the result is
    deterministic. Uses one or two selections (``kth_smallest``) instead of a sort.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    start, stop = max(0, start), min(n, stop)
    if stop <= start:
        return torch.zeros_like(values, dtype=torch.bool)
    mask = torch.ones(n, dtype=torch.bool, device=flat.device)
    if start > 0:
        low = kth_smallest(flat, start)
        torch.ge(flat, low, out=mask)
        surplus = int(torch.count_nonzero(mask)) - (n - start)  # ties at `low` ranked below `start`: the earliest go
        if surplus > 0:
            mask[(flat == low).nonzero().squeeze(1)[:surplus]] = False
    if stop < n:
        high = kth_smallest(flat, stop - 1)
        within = flat <= high
        surplus = int(torch.count_nonzero(within)) - stop  # ties at `high` ranked at or past `stop`: the latest go
        if surplus > 0:
            ties = (flat == high).nonzero().squeeze(1)
            within[ties[ties.numel() - surplus:]] = False
        mask &= within
    return mask.reshape(values.shape)


def top_magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Mask of the ``keep_count`` largest |delta| (TIES trim); among equal magnitudes at the threshold
    the earlier positions are kept (a stable sort by descending magnitude)."""
    magnitude = delta.abs().reshape(-1)
    n = magnitude.numel()
    k = keep_count(n, density)
    if k in (0, n):
        return torch.full_like(delta, k == n, dtype=torch.bool)
    threshold = kth_smallest(magnitude, n - k)
    mask = magnitude >= threshold
    surplus = int(torch.count_nonzero(mask)) - k
    if surplus > 0:  # equal magnitudes at the threshold: the latest go
        ties = (magnitude == threshold).nonzero().squeeze(1)
        mask[ties[ties.numel() - surplus:]] = False
    return mask.reshape(delta.shape)


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


def mask_and_rescale_(delta: Tensor, mask: Tensor, density: float, rescale: str) -> Tensor:
    """Zero the entries of ``delta`` outside ``mask``, in place, and rescale what survives.

    ``inverse_density``: divide by the keep probability, the DARE paper's unbiased 1/(1−p) rescale.
    ``l1``: match the L1 norm of the unmasked delta (mergekit 0.1.5's ``rescale: true``).
    ``none``: no rescale. A zero density or an all-zero result returns zeros, never NaN.
    """
    before = delta.abs().sum() if rescale == "l1" else None
    delta.masked_fill_(~mask, 0)
    if rescale == "inverse_density" and density > 0:
        delta.div_(density)
    elif before is not None:
        after = delta.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            delta.mul_(before / after)
    return delta


def consensus_combine(deltas: Tensor, weights: Tensor, *, normalize: bool) -> Tensor:
    """TIES's sign election and disjoint merge of task vectors ``deltas`` (n, *shape), weights (n,).

    With u_i = w_i τ_i: the sign s = sign(Σ_i u_i) is elected per entry (a sum of exactly 0 elects +);
    model i agrees where s·u_i > 0 (a zero entry has no sign and never agrees); the result is
    Σ_agree u_i, divided by Σ_agree w_i when ``normalize`` (1 where no model agrees). Runs in
    cache-sized blocks, and the sums over models are matrix-vector products.
    """
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)  # (n, entries)
    weight_signs = weights.sign().reshape(n, 1)
    merged = torch.empty(flat.shape[1], dtype=deltas.dtype, device=deltas.device)
    for block in blocks(flat.shape[1]):
        part = flat[:, block]  # (n, block)
        elected = torch.where(weights @ part >= 0, 1.0, -1.0).to(part.dtype)
        agrees = ((part * elected) * weight_signs > 0).to(part.dtype)  # sign(w_i τ_i) = s
        total = weights @ (part * agrees)
        if normalize:
            divisor = weights @ agrees
            total.div_(divisor.masked_fill_(divisor == 0, 1.0))
        merged[block] = total
    return merged.reshape(deltas.shape[1:])
