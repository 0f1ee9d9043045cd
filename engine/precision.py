"""How parameters meet torch.autocast in the ops autocast does not cover."""
from __future__ import annotations

import torch


def autocast_weight(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`weight` in the autocast dtype when autocast is on for x's device (ops autocast does not cover, the
    norms and the fused loss, would otherwise promote a bf16 input to fp32 and hand attention fp32 q/k)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and weight.dtype.is_floating_point:
        return weight.to(torch.get_autocast_dtype(device))
    return weight
