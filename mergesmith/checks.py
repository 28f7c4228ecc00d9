"""Checks shared by the readers, the methods, the engine and measure: tensor values, the device."""

from __future__ import annotations

from mergesmith.errors import UsageError
from mergesmith.lazy import lazy_import

torch = lazy_import("torch")


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


def check_device(device: str | torch.device) -> torch.device:
    """The device, if this machine has it (checked before a merge or a measurement starts, not at its
    first tensor)."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device; use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    return device
