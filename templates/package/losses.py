"""Task losses, computed as Hugging Face computes them (float32 logits, ignore_index -100).

`num_items_in_batch` (passed by HF Trainer under gradient accumulation) turns the mean into a sum
divided by that count, as transformers' `fixed_cross_entropy` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    # logits: [N, C] float32; labels: [N]
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t + 1]; mean over non-ignored tokens."""
    # logits: [B, T, V]; labels: [B, T]
    labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # [B, T], shifted left
    return _cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device), num_items_in_batch
    )


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy at every labelled position (no shift)."""
    return _cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device), num_items_in_batch
    )


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Regression (one output) or single-label classification, as HF's default problem types."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return _cross_entropy(logits.float(), labels.reshape(-1).to(logits.device), num_items_in_batch)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T + bias` against `labels`, chunk by chunk of tokens.

    The [tokens, vocab] logits never exist at once: each chunk's logits are turned into its loss
    and, right away, into its gradients for hidden, weight and bias (softmax - one_hot), which
    backward only scales. Peak extra memory is one chunk of logits plus the gradient buffers.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int, num_items_in_batch=None):
        # hidden: [N, H]; weight: [V, H]; bias: [V] or None; labels: [N] with IGNORE_INDEX skipped
        n = hidden.shape[0]
        valid = labels != IGNORE_INDEX
        total = valid.sum()  # the mean's divisor, unless HF Trainer gives the count over the whole batch
        if num_items_in_batch is not None:
            total = torch.as_tensor(num_items_in_batch, device=hidden.device)
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = None  # float32 [V, H], accumulated in place: no vocab-sized temporary per chunk
        grad_bias = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if bias is not None else None
        )
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk]  # [C, H]
            y = labels[start : start + chunk]  # [C]
            logits = (h @ weight.T).float()  # [C, V], the only vocab-sized buffer
            if bias is not None:
                logits += bias.float()
            keep = (y != IGNORE_INDEX).float()  # [C]
            target = y.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)  # [C]
            loss += ((lse - logits.gather(1, target[:, None]).squeeze(1)) * keep).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place: [C, V]
            grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1.0
            grad *= (keep / total)[:, None]
            if need_h:
                grad_hidden[start : start + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                if grad_weight is None:
                    grad_weight = grad.T @ h.float()
                else:
                    grad_weight.addmm_(grad.T, h.float())
            if grad_bias is not None:
                grad_bias += grad.sum(dim=0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.has = (need_h, need_w, bias is not None)
        ctx.weight_dtype = weight.dtype
        return loss / total

    @staticmethod
    def backward(ctx, grad_loss):
        # the gradients were computed in forward; scale them in place (so backward runs once per forward)
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        need_h, need_w, has_bias = ctx.has
        return (
            grad_hidden.mul_(grad_loss) if need_h else None,
            grad_weight.mul_(grad_loss).to(ctx.weight_dtype) if need_w else None,
            grad_bias.mul_(grad_loss) if has_bias else None,
            None,
            None,
            None,
        )


def fused_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias,
    labels: torch.Tensor,
    chunk: int | None = None,
    num_items_in_batch=None,
) -> torch.Tensor:
    """`causal_lm_loss(hidden @ weight.T + bias, labels)` without materializing the logits."""
    # hidden: [B, T, H]; labels: [B, T]
    labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1).to(hidden.device)  # [B*T]
    flat = hidden.reshape(-1, hidden.shape[-1])  # [B*T, H]
    if chunk is None:  # about 128 MiB of float32 logits per chunk: few, large matmuls
        chunk = max(8, min(flat.shape[0], (1 << 25) // weight.shape[0]))
    return FusedLinearCrossEntropy.apply(flat, weight, bias, labels, chunk, num_items_in_batch)
