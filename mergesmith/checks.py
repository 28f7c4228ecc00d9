"""Checks of tensor values shared by the readers, the methods and the engine."""

from __future__ import annotations

import torch


def value_range(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) in one pass (aminmax is the cheapest full read torch has, bfloat16 included); NaN reaches
    both ends and an infinity one of them, so both are finite exactly when every entry is."""
    if not tensor.numel():
        zero = tensor.new_zeros(())
        return zero, zero
    return torch.aminmax(tensor)


def all_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point():
        return True
    low, high = value_range(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
