"""Task-vector sparsifiers and the sign-consensus combine of TIES, DARE and Model Breadcrumbs.

All masks keep exactly the documented number of entries; ties in magnitude are broken by position
(lower flat index first), so results are deterministic (mergekit's argsort leaves that order unspecified).
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


def _rank_ascending(magnitude: Tensor) -> Tensor:
    """Flat indices sorted by magnitude, ties by position."""
    return torch.sort(magnitude.reshape(-1), stable=True).indices


_SAMPLE = 1 << 16


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The exact k-th largest entry of a flat tensor, in a few linear passes.

    A fixed-seed sample brackets the answer's rank; an exact selection then runs on the entries inside
    the bracket only (a few percent of them). If the bracket misses, a full selection runs, so the
    answer never depends on the sample.
    """
    n = values.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(values, n - k + 1).values
    generator = torch.Generator(device=values.device).manual_seed(0)
    picks = torch.randint(n, (_SAMPLE,), generator=generator, device=values.device)
    sample = values[picks].sort().values
    rank = (n - k) / n  # the answer's quantile in ascending order
    margin = 0.02  # ≈ 5 standard deviations of a quantile estimated from 65536 draws
    low = sample[max(0, int((rank - margin) * _SAMPLE))]
    high = sample[min(_SAMPLE - 1, int((rank + margin) * _SAMPLE))]
    above = int((values > high).sum())
    inside = values[(values >= low) & (values <= high)]
    if above < k <= above + inside.numel():
        return torch.kthvalue(inside, inside.numel() - (k - above) + 1).values
    return torch.kthvalue(values, n - k + 1).values


def top_magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Boolean mask of the ``keep_count`` largest-|delta| entries (TIES trim).

    Found by selection (``kth_largest``) rather than a full sort; entries equal to the threshold are
    taken in index order until the count is met.
    """
    numel = delta.numel()
    k = keep_count(numel, density)
    if k >= numel:
        return torch.ones_like(delta, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    magnitude = delta.abs().reshape(-1)
    threshold = kth_largest(magnitude, k)
    mask = magnitude > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        at_threshold = (magnitude == threshold).nonzero().squeeze(1)[:missing]
        mask[at_threshold] = True
    return mask.reshape(delta.shape)


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs (arXiv:2312.06795): drop the ⌊γn⌋ largest magnitudes as outliers and the smallest
    ones so that ⌊density·n⌋ entries remain.

    When outliers plus kept entries exceed n, fewer outliers are dropped (the kept count wins), as in
    mergekit 0.1.5. Unlike older mergekit releases, a tensor with fewer than 1/γ elements (no outliers)
    keeps its top ⌊density·n⌋ entries instead of becoming all zeros.
    """
    numel = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    kept = int(density * numel)
    outliers = int(gamma * numel)
    dropped_small = max(0, numel - kept - outliers)
    order = _rank_ascending(delta.abs())
    mask = torch.zeros(numel, dtype=torch.bool, device=delta.device)
    mask[order[dropped_small:dropped_small + kept]] = True
    return mask.reshape(delta.shape)


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
