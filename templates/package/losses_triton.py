"""The row pass of the fused linear cross-entropy as one Triton kernel (imported only on the Triton path).

For each chunk of tokens `losses.FusedLinearCrossEntropy` holds the [C, V] logits of one GEMM. PyTorch ops
turn them into the loss and the gradient through a float32 copy and several passes (~42 bytes per logit
in bf16); this kernel reads each row twice and writes it once in place (6 bytes per logit in bf16, no
float32 copy): pass 1 keeps a running max and sum of exponentials (the log-sum-exp), pass 2 overwrites the
row with its gradient softmax - one_hot, in the logits' own dtype; ignored rows get a zero gradient.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def cross_entropy_rows_kernel(
    logits_ptr,  # [C, V] logits; overwritten with softmax - one_hot (0 on ignored rows) when WRITE_GRAD
    row_stride,  # elements between rows of logits
    target_ptr,  # [C] int64 target class, >= 0
    keep_ptr,  # [C] bool: the row's label is not ignore_index
    loss_ptr,  # [C] float32 out: logsumexp(row) - row[target] (0 on ignored rows)
    V,  # vocabulary size (row length)
    WRITE_GRAD: tl.constexpr,  # whether to overwrite the logits with the gradient
    BLOCK_V: tl.constexpr,  # columns per step
):
    """One program per row: the log-sum-exp in one pass, the loss, then the gradient in a second pass."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)  # [BLOCK_V]
    top = tl.full([], float("-inf"), tl.float32)  # running max
    total = tl.full([], 0.0, tl.float32)  # running sum of exp(x - top)
    for start in range(0, V, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)  # [BLOCK_V]
        new_top = tl.maximum(top, tl.max(x, axis=0))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), axis=0)
        top = new_top
    lse = top + tl.log(total)
    keep = tl.load(keep_ptr + row)
    target = tl.load(target_ptr + row)
    at_target = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(keep, lse - at_target, 0.0))
    if WRITE_GRAD:
        weight = tl.where(keep, 1.0, 0.0)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(base + offs, mask=offs < V, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)
            tl.store(base + offs, (grad * weight).to(logits_ptr.dtype.element_ty), mask=offs < V)


def cross_entropy_rows(
    logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, write_grad: bool, block: int | None = None
) -> torch.Tensor:
    """Per-row losses [C] (float32) of `logits` [C, V] against `target` [C] (>= 0), 0 where not `keep`; with
    `write_grad`, `logits` is overwritten with the gradient of each row's loss, softmax - one_hot. `block`:
    columns per step (default: the whole row up to 16384, 65536 under the interpreter)."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "the row pass needs contiguous rows"
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if block is None:
        block = min(triton.next_power_of_2(vocab), 65536 if interpreted else 16384)
    cross_entropy_rows_kernel[(rows,)](
        logits,
        logits.stride(0),
        target.contiguous(),
        keep.contiguous(),
        loss,
        vocab,
        WRITE_GRAD=write_grad,
        BLOCK_V=block,
        num_warps=min(32, max(4, block // 512)),
    )
    return loss
