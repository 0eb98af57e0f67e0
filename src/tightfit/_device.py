"""Checking a device argument when it is given, not when the first tensor is moved there."""

from __future__ import annotations

import torch

from .errors import ConfigError


def checked_device(who: str, device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, refused with a ConfigError naming ``who`` when it is not a
    device name or this machine's torch cannot use it (a CUDA or MPS device without one)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"{who}: `device` must be a torch device such as 'cpu' or 'cuda:0', but got {device!r} ({exc})."
        ) from None
    checks = {
        "cuda": ("torch.cuda.is_available()", torch.cuda.is_available),
        "mps": ("torch.backends.mps.is_available()", lambda: torch.backends.mps.is_available()),
    }
    if parsed.type in checks and not checks[parsed.type][1]():
        raise ConfigError(
            f"{who}: `device` is {device!r}, but this machine's torch has no {parsed.type.upper()} device "
            f"({checks[parsed.type][0]} is False); use device='cpu'."
        )
    return parsed
