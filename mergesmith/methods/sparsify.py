"""Task-vector sparsifiers and the sign-consensus combine of TIES, DARE and Model Breadcrumbs.

All masks keep exactly the documented number of entries. Magnitudes are ranked by a stable ascending
sort (equal magnitudes by position), so results are deterministic; mergekit's argsort leaves the order of
equal magnitudes unspecified.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    size = min(1 << 16, n // 16)
    generator = torch.Generator(device=values.device).manual_seed(0)
    sample = values[torch.randint(n, (size,), generator=generator, device=values.device)].sort().values
    quantile = rank / n
    margin = 2.5 / size**0.5  # 5 standard deviations of a sample quantile, at worst (q = 1/2)
    low = sample[max(0, int((quantile - margin) * size))]
    high = sample[min(size - 1, int((quantile + margin) * size))]
    below = int((values < low).sum())
    inside = values[(values >= low) & (values <= high)]
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
        surplus = int(mask.sum()) - (n - start)  # ties at `low` ranked below `start`: the earliest go
        if surplus > 0:
            mask[(flat == low).nonzero().squeeze(1)[:surplus]] = False
    if stop < n:
        high = kth_smallest(flat, stop - 1)
        within = flat <= high
        surplus = int(within.sum()) - stop  # ties at `high` ranked at or past `stop`: the latest go
        if surplus > 0:
            ties = (flat == high).nonzero().squeeze(1)
            within[ties[ties.numel() - surplus:]] = False
        mask &= within
    return mask.reshape(values.shape)


def top_magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Mask of the ``keep_count`` largest |delta| (TIES trim); among equal magnitudes at the threshold
    the earlier positions are kept (a stable sort by descending magnitude)."""
    return rank_range_mask(delta.abs().neg_(), 0, keep_count(delta.numel(), density))


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


def rescale_masked(delta: Tensor, mask: Tensor, density: float, rescale: str) -> Tensor:
    """Apply ``mask`` and rescale what survives.

    ``inverse_density``: divide by the keep probability, the DARE paper's unbiased 1/(1−p) rescale.
    ``l1``: match the L1 norm of the unmasked delta (mergekit 0.1.5's ``rescale: true``).
    ``none``: no rescale. A zero density or an all-zero result returns zeros, never NaN.
    """
    masked = delta * mask
    if rescale == "none":
        return masked
    if rescale == "inverse_density":
        return masked / density if density > 0 else masked
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


_CHUNK = 1 << 22  # entries per model per step of the sign election: bounds its temporaries


def consensus_combine(weighted: Tensor, weights: Tensor, *, elect_sign: bool, normalize: bool) -> Tensor:
    """Combine weighted task vectors ``weighted`` (n, *shape) with per-model ``weights`` (n,).

    Without sign election: Σ_i w_i τ_i, divided by Σ_i w_i when ``normalize`` (a near-zero sum is treated
    as 1). With election (TIES): the sign of Σ_i w_i τ_i is elected per entry; only entries whose weighted
    sign agrees with it are summed, and ``normalize`` divides by the summed weights of the agreeing
    models (1 where none agree). A zero entry has no sign and never agrees.
    """
    n = weighted.shape[0]
    flat = weighted.reshape(n, -1)  # (n, entries)
    if not elect_sign:
        total = flat.sum(dim=0)
        divisor = float(weights.sum())
        if normalize and abs(divisor) >= 1e-8:
            total.div_(divisor)
        return total.reshape(weighted.shape[1:])
    total = torch.empty(flat.shape[1], dtype=weighted.dtype, device=weighted.device)
    column = weights.reshape(n, 1)
    for start in range(0, flat.shape[1], _CHUNK):
        part = flat[:, start:start + _CHUNK]  # (n, chunk)
        elected = torch.where(part.sum(dim=0) >= 0, 1.0, -1.0).to(part.dtype)
        agrees = part.sign() == elected
        chunk_total = (part * agrees).sum(dim=0)
        if normalize:
            divisor = (column * agrees).sum(dim=0)
            chunk_total.div_(torch.where(divisor == 0, 1.0, divisor))
        total[start:start + _CHUNK] = chunk_total
    return total.reshape(weighted.shape[1:])
