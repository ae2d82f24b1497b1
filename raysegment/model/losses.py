"""Weighted cross-entropy + weighted soft Dice for 4-class segmentation.

Imports ``config`` only; nothing of ``data`` or the stages above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raysegment.config import LossConfig

__all__ = ["LossConfig", "deep_supervision_loss", "segmentation_loss", "soft_dice_per_class"]


def soft_dice_per_class(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Batch soft Dice for classes 1..C-1 → tensor (C-1,). Sums over the batch and pixels."""
    probs = logits.float().softmax(dim=1)[:, 1:]
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return (2 * inter + smooth) / (denom + smooth)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """Scalar loss for logits (N, C, H, W) and integer target (N, H, W)."""
    w = torch.tensor((1.0, *config.class_weights), device=logits.device, dtype=torch.float32)
    loss = logits.new_zeros((), dtype=torch.float32)
    if config.ce_weight:
        loss = loss + config.ce_weight * F.cross_entropy(logits.float(), target.long(), weight=w)
    if config.dice_weight:
        dice = soft_dice_per_class(logits, target, config.smooth)
        loss = loss + config.dice_weight * ((1 - dice) * w[1:]).sum() / w[1:].sum()
    return loss


def deep_supervision_loss(levels: list[torch.Tensor], target: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """``segmentation_loss`` of the full-resolution logits and of each coarser head's (strides 2,
    4, …, as ``UNet.forward(x, aux=True)`` returns them) against the target taken every s-th pixel,
    weighted 1, 1/2, 1/4, … and normalised to sum 1 (nnU-Net's weights, less its zero last level).
    With the full-resolution logits alone it is ``segmentation_loss`` of them, bit for bit."""
    weights = [0.5 ** k for k in range(len(levels))]
    loss = sum(wt * segmentation_loss(z, target[:, :: 2 ** k, :: 2 ** k], config)
               for k, (wt, z) in enumerate(zip(weights, levels)))
    return loss / sum(weights)
