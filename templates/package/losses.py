"""Task losses, computed as Hugging Face computes them (float32 logits, ignore_index -100)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t + 1]; mean over non-ignored tokens."""
    # logits: [B, T, V]; labels: [B, T]
    labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # [B, T], shifted left
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX
    )


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at every labelled position (no shift)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX
    )


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Regression (one output) or single-label classification, as HF's default problem types."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.reshape(-1))
