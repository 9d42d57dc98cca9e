"""Task losses, computed as Hugging Face computes them (float32 logits, ignore_index -100).

`num_items_in_batch` (passed by HF Trainer under gradient accumulation) turns the mean into a sum
divided by that count, as transformers' `fixed_cross_entropy` does.

A spec's `loss` lines choose among these (dslc's N.LOSSES table): `cross_entropy` with `label_smoothing` and a
class `weight` (torch.nn.CrossEntropyLoss's), `mse` / `bce` (`pos_weight`) for classifiers, and the auxiliary
`z_loss` (AUX_LOSSES), reported beside `loss` and added to it times its `coef`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .kernels import use_triton

IGNORE_INDEX = -100


def class_weights(weight, classes: int, device) -> torch.Tensor | None:
    """A declared per-class weight (a config list, one number per class) as a float32 tensor, or None."""
    if weight is None:
        return None
    weight = torch.as_tensor(weight, dtype=torch.float32, device=device)
    if weight.shape != (classes,):
        raise ValueError(
            f"the loss's class weights have {weight.numel()} entries, but the logits have {classes} classes"
        )
    return weight


def _divide(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, label_smoothing: float = 0.0, weight=None
) -> torch.Tensor:
    # logits: [N, C] float32; labels: [N]
    weight = class_weights(weight, logits.shape[-1], logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(
            logits, labels, weight=weight, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
        )
    loss = F.cross_entropy(
        logits, labels, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing
    )
    return _divide(loss, num_items_in_batch)


def _shift(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, t + 1] at position t (the last position ignored): what a causal LM predicts."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, **options) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t + 1]; mean over non-ignored tokens.
    `options`: cross_entropy's `label_smoothing` and class `weight` ([vocab])."""
    # logits: [B, T, V]; labels: [B, T]
    labels = _shift(labels)  # [B, T], shifted left
    return _cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1).to(logits.device),
        num_items_in_batch,
        **options,
    )


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, **options) -> torch.Tensor:
    """Cross-entropy at every labelled position (no shift)."""
    return _cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1).to(logits.device),
        num_items_in_batch,
        **options,
    )


PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
# a declared main loss of a classifier -> the problem type it computes
LOSS_PROBLEM_TYPES = {
    "mse": "regression",
    "cross_entropy": "single_label_classification",
    "bce": "multi_label_classification",
}


def sequence_classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch=None,
    problem_type: str | None = None,
    label_smoothing: float = 0.0,
    weight=None,
    pos_weight=None,
) -> torch.Tensor:
    """[B, num_labels] logits against `labels` by the config's `problem_type`, as transformers' classification
    loss: regression (MSE), single-label (cross-entropy over integer labels, with `label_smoothing` and class
    `weight`) or multi-label (BCE with logits over float [B, num_labels] targets, with `pos_weight`). Left None
    it is inferred as HF does: one output is regression, integer labels single-label, anything else multi-label."""
    num_labels = logits.shape[-1]
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze().float(), labels.squeeze().float())
        return F.mse_loss(logits.float(), labels.float())
    if problem_type == "single_label_classification":
        return _cross_entropy(
            logits.float().reshape(-1, num_labels), labels.reshape(-1), num_items_in_batch, label_smoothing, weight
        )
    if problem_type == "multi_label_classification":
        if labels.shape != logits.shape:
            raise ValueError(
                f"multi-label classification needs float labels shaped like the logits {tuple(logits.shape)}, "
                f"got {tuple(labels.shape)} {labels.dtype}"
            )
        pos_weight = class_weights(pos_weight, num_labels, logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pos_weight)
    raise ValueError(f"config problem_type {problem_type!r}: use one of {', '.join(PROBLEM_TYPES)} or leave it unset")


def z_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, shift: bool = False) -> torch.Tensor:
    """PaLM's z-loss (Fast-LLM's `z_loss`): the mean over labelled rows of logsumexp(logits)^2, which keeps the
    softmax's normalizer near 1. Rows are the positions whose label is not -100 (`shift`: a causal LM's, whose
    position t is labelled by labels[t + 1]); float labels (regression, multi-label) label every row. With
    `num_items_in_batch` the sum is divided by it, as the cross-entropy is."""
    # logits: [..., C]; labels: logits.shape[:-1] (integer) or any float labels of the same rows
    lse = torch.logsumexp(logits.float(), dim=-1)  # [...]
    if labels.is_floating_point():
        keep = torch.ones_like(lse, dtype=torch.bool)
    else:
        keep = (_shift(labels) if shift else labels).reshape(lse.shape).to(lse.device) != IGNORE_INDEX
    total = torch.where(keep, lse.square(), torch.zeros((), device=lse.device)).sum()
    return total / keep.sum() if num_items_in_batch is None else _divide(total, num_items_in_batch)


AUX_LOSSES = {"z_loss": z_loss}  # the auxiliary kinds a `loss` line declares: output field -> its function


MIN_CHUNK_BYTES = 256 << 20  # below this the [C, V] buffers are small next to the rest of a step: one chunk
MAX_CHUNK_BYTES = 2 << 30  # above this more tokens per chunk no longer pay (accumulation traffic under ~10%)


def chunk_buffer_bytes(vocab: int, dtype: torch.dtype, softcap: bool = False) -> int:
    """Bytes per token of the [C, V] buffers one chunk holds at once (see FusedLinearCrossEntropy.forward):
    the float32 logits (4) and, for a narrower dtype, the logits or gradient in that dtype (2 for bf16); a
    final soft-cap adds its slope 1 - tanh^2 in that dtype (8 bytes per logit in bf16 and in float32)."""
    size = torch.empty((), dtype=dtype).element_size()
    return vocab * (4 + (size if size < 4 else 0) + (size if softcap else 0))


def default_chunk(tokens: int, vocab: int, hidden_size: int, dtype: torch.dtype, softcap: bool = False) -> int:
    """Tokens per chunk of the fused loss for `tokens` x `hidden_size` hidden states, a `vocab`-row head in `dtype`.

    Memory: the chunk's [C, V] buffers (`chunk_buffer_bytes`: 6 bytes per logit in bf16, 4 in float32) get a
    budget of 3/4 of the [N, V] logits in `dtype` that HF eager materializes as its first step (it then holds
    an fp32 copy and the fp32 and bf16 gradients too: >= 10 bytes per logit in bf16), clamped to
    [MIN_CHUNK_BYTES, MAX_CHUNK_BYTES]; the chunks are the fewest that fit it, of equal size (one token
    per chunk at least, even where a token's buffers alone exceed the budget).

    Time: per chunk the three GEMMs (logits, grad hidden, grad weight) cost 6*C*V*H flops and the float32
    grad-weight accumulation moves 12*V*H bytes whatever C (bf16 partial written, read back, float32 read and
    written), so with F flop/s and B byte/s the accumulation is 2*F / (C*B) of the GEMM time, independent of
    V and H: about 400 / C on an H200 (~1e15 bf16 flop/s, 4.8e12 byte/s). Beside the GEMMs the chunk's
    element-wise row pass moves ~42 bytes per logit in bf16 (GEMM output 2, fp32 copy 2 + 4, max 4, exp
    8 + 8, sum 4, scaled bf16 gradient 4 + 2, read by the two GEMMs 2 + 2), so the accumulation is ~160 / C
    of the chunk's time at H = 896: 8% at 2048 tokens, while hundreds of tokens (the former rule: ~220 at
    V = 151936, 37 chunks at 8192 tokens) made it a cost as large as the GEMMs. `hidden_size` does not
    change the rule beyond this (kept for callers that size chunks by it). `softcap`: the chunks hold a final
    soft-cap's slope too (`chunk_buffer_bytes`), so they are smaller.

    Qwen2-0.5B (N = 8192, V = 151936, H = 896, bf16): the budget is 1.87 GB (0.75 * 2 * N * V), 7.47 GB of
    buffers in all, 4 chunks of 2048 tokens: 1.87 GB of [C, V] buffers per chunk, against HF's >= 12.4 GB.
    Estimated on an H200: GEMMs 6.7 Tflop (~7 ms), row passes ~52 GB (~11 ms), accumulation 4 x 1.63 GB
    (~1.4 ms; the former 37 chunks: ~13 ms, besides its ~33 ms float32 grad-weight GEMM).
    """
    del hidden_size  # see above: the trade-off between memory and accumulation traffic does not involve it
    if tokens <= 0:
        return 1
    size = torch.empty((), dtype=dtype).element_size()
    per_token = chunk_buffer_bytes(vocab, dtype, softcap)
    budget = min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, 3 * tokens * vocab * size // 4))
    most = max(1, budget // per_token)  # tokens that fit the budget (integers: exact at the 3/4 boundary)
    chunks = -(-tokens // most)  # the fewest chunks of at most `most` tokens...
    return -(-tokens // chunks)  # ...of equal size (the last one up to `chunks - 1` tokens shorter)


def _chunk_grads(grad, h, weight, need_w: bool, grad_hidden, grad_weight, grad_bias, start: int):
    """Add one chunk's gradients (`grad`: [C, V] softmax - one_hot in the GEMM dtype) into the buffers that
    exist (None: not wanted; `grad_weight` is created at the first chunk): hidden [C, H] rows, the float32
    [V, H] weight sum, the float32 [V] bias sum. Returns (grad_hidden, grad_weight)."""
    if grad_hidden is not None:
        grad_hidden[start : start + grad.shape[0]] = grad @ weight  # [C, H], cast to hidden's dtype
    if need_w:
        if grad_weight is None:
            grad_weight = (grad.T @ h).float()  # [V, H]
        elif grad.dtype == torch.float32:
            grad_weight.addmm_(grad.T, h)
        else:
            grad_weight += grad.T @ h  # a bf16 [V, H] partial into the float32 sum
    if grad_bias is not None:
        grad_bias += grad.sum(dim=0, dtype=torch.float32)
    return grad_hidden, grad_weight


def _softcap_rows(logits, softcap: float, dtype):
    """A chunk's soft-capped logits cap * tanh(logits / cap) in float32, and the cap's slope 1 - tanh^2 [C, V]
    in `dtype` (computed in float32, rounded once), the factor backward takes the gradient through."""
    z = logits.float().div_(softcap).tanh_()  # [C, V] tanh(logits / cap), in place on a float32 `logits`
    one = torch.ones((), device=z.device)
    slope = torch.addcmul(one, z, z, value=-1, out=torch.empty_like(z, dtype=dtype))  # 1 - tanh^2
    return z.mul_(softcap), slope


def _declared_rows(logits, target, keep, label_smoothing, class_weight, z_coef, total, z_total, want_grad, dtype):
    """One chunk's declared loss (FusedLinearCrossEntropy's docstring): (gradient [C, V] in `dtype` scaled for
    the divisor `total`, or None; summed cross-entropy; summed lse^2) of [C, V] `logits` against `target` [C, 1]."""
    z = logits.float()  # [C, V]
    vocab = z.shape[1]
    zero = torch.zeros((), device=z.device)
    w_target = class_weight[target.squeeze(1)] if class_weight is not None else torch.ones_like(z[:, 0])  # [C]
    w_target = torch.where(keep, w_target, zero)
    weight_sum = class_weight.sum() if class_weight is not None else vocab
    smooth = label_smoothing / vocab
    z_target = z.gather(1, target).squeeze(1)  # [C]
    dot = (z @ class_weight if class_weight is not None else z.sum(dim=1)) if smooth else zero  # z . w, [C]
    top = z.amax(dim=1, keepdim=True)
    z.sub_(top).exp_()
    norm = z.sum(dim=1, keepdim=True)
    lse = (top + norm.log()).squeeze(1)  # [C]
    row = (1 - label_smoothing) * w_target * (lse - z_target) + smooth * (weight_sum * lse - dot)
    row_loss = torch.where(keep, row, zero).sum()
    row_z = torch.where(keep, lse.square(), zero).sum()
    if not want_grad:
        return None, row_loss, row_z
    # gradient a * p - (1 - eps) w_y e_y - eps / V w per kept row; the z-loss's 2 lse p rescaled to `total`
    a = (1 - label_smoothing) * w_target + smooth * weight_sum
    if z_coef is not None:
        a = a + z_coef * 2 * lse * (total / z_total)
    a = torch.where(keep, a, zero)
    grad = z.mul_(a[:, None] / norm)
    if smooth:
        w = class_weight if class_weight is not None else torch.ones(vocab, device=z.device)
        grad.addr_(keep.float(), w, alpha=-smooth)
    at_target = grad.gather(1, target).squeeze(1) - (1 - label_smoothing) * w_target  # [C]
    grad.scatter_(1, target, at_target[:, None])
    return grad.to(dtype), row_loss, row_z


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T + bias` against `labels`, chunk by chunk of tokens.

    The [tokens, vocab] logits never exist at once: each chunk's logits are turned, in place, into its loss
    and right away into its gradients for hidden, weight and bias (softmax - one_hot), which backward only
    scales by grad_loss / total (the mean's divisor, or `num_items_in_batch`).

    The three GEMMs take the input dtype (bf16 in training) and accumulate in float32 inside the GEMM, as HF's
    F.linear and its backward do; the loss and softmax are computed on float32 logits, as HF upcasts them.
    The weight gradient is one bf16 GEMM per chunk, [V, C] @ [C, H] -> [V, H] in bf16, added into a float32
    [V, H] accumulator: per chunk 2*V*H flops * C for the GEMM against 12*V*H bytes for the accumulation
    (2 written by the GEMM, 2 + 4 read, 4 written); `default_chunk` sizes chunks so that is ~10% of the chunk.
    Accumulating into the bf16 weight dtype instead (Liger's addmm_) would move 4*V*H bytes but round the
    running sum to bf16 once per chunk; the float32 accumulator rounds each chunk's partial once, like HF's
    single GEMM over all tokens. float32 inputs run float32 GEMMs (addmm_ into the float32 accumulator): exact
    as the unfused loss. Peak extra memory: one chunk's [C, V] buffers (`chunk_buffer_bytes`) plus the
    gradients (float32 [V, H] and the bf16 partial for a bf16 weight).

    A declared `label_smoothing`, class `weight` ([V] float32) or z-loss `z_coef` run in the same chunks (on the
    PyTorch row pass): per kept row, with p = softmax(z), y the target, w the weights (1 without), S = sum(w),
    eps the smoothing, the loss is (1 - eps) w_y (lse - z_y) + eps / V (S lse - z . w), the mean's divisor the
    sum of w_y over kept rows, and the gradient (1 - eps) w_y (p - e_y) + eps / V (S p - w); the z-loss adds
    lse^2 per kept row (divided by the kept rows) and 2 lse p to the gradient, times `z_coef`. Returns (loss,
    z_loss): `loss` has the z-loss in it times `z_coef`; `z_loss` (0 without) is reported, not differentiated.

    A final `softcap` (Gemma 2's final_logit_softcapping) runs in the chunks too: each chunk's logits become
    z = cap * tanh(logits / cap) in float32 before the row pass (the losses above are of z), and the row pass's
    gradient with respect to z is multiplied by dz/dlogits = 1 - tanh^2, kept as a [C, V] slope in the GEMM
    dtype, before the gradient GEMMs: one more [C, V] buffer per chunk (`chunk_buffer_bytes`).
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        labels,
        chunk: int,
        num_items_in_batch=None,
        label_smoothing: float = 0.0,
        class_weight=None,
        z_coef=None,
        softcap=None,
    ):
        # hidden: [N, H]; weight: [V, H]; bias: [V] or None; labels: [N] with IGNORE_INDEX skipped
        n = hidden.shape[0]
        dtype = weight.dtype  # the GEMMs' operand dtype
        valid = labels != IGNORE_INDEX
        total = valid.sum()  # the mean's divisor, unless HF Trainer gives the count over the whole batch
        z_total = total  # the z-loss's
        if class_weight is not None:  # the weighted mean's divisor: the kept rows' target weights
            total = torch.where(valid, class_weight[labels.clamp(min=0)], 0.0).sum()
        if num_items_in_batch is not None:
            total = z_total = torch.as_tensor(num_items_in_batch, device=hidden.device)
        plain = label_smoothing == 0.0 and class_weight is None and z_coef is None and softcap is None
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = None  # float32 [V, H], accumulated in place
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        b = bias.to(dtype) if bias is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk].to(dtype)  # [C, H]
            keep = valid[start : start + chunk]  # [C]
            target = labels[start : start + chunk].clamp(min=0)[:, None]  # [C, 1]
            # [C, V] buffers alive at once, in bf16: `logits` (bf16) and `z` (fp32) until `del logits`, then
            # `z` and `grad` (bf16): 6 bytes per logit. In float32 `z` is `logits` and `grad` is `z`: 4 bytes.
            logits = h @ weight.T if b is None else torch.addmm(b, h, weight.T)  # [C, V] in dtype
            want_grad = need_h or need_w or need_b
            if not plain:  # a declared smoothing, class weight, z-loss or soft-cap: the general row pass
                slope = None
                if softcap is not None:  # the losses are of cap * tanh(logits / cap)
                    logits, slope = _softcap_rows(logits, softcap, dtype)  # float32 [C, V], [C, V] in dtype
                grad, row_loss, row_z = _declared_rows(
                    logits, target, keep, label_smoothing, class_weight, z_coef, total, z_total, want_grad, dtype
                )
                del logits
                loss += row_loss
                z_sum += row_z
                if grad is not None:
                    if slope is not None:
                        grad.mul_(slope)  # through the cap: d loss / d logits = d loss / d z * (1 - tanh^2)
                    grad_hidden, grad_weight = _chunk_grads(
                        grad, h, weight, need_w, grad_hidden, grad_weight, grad_bias, start
                    )
                del grad, slope
                continue
            if use_triton(logits):  # one kernel: loss per row, gradient in place (no float32 copy)
                from .losses_triton import cross_entropy_rows

                loss += cross_entropy_rows(logits, target.squeeze(1), keep, want_grad).sum()
                grad = logits if want_grad else None
                del logits
                if grad is not None:
                    grad_hidden, grad_weight = _chunk_grads(
                        grad, h, weight, need_w, grad_hidden, grad_weight, grad_bias, start
                    )
                del grad
                continue
            z = logits.float()  # [C, V] float32 (the same tensor for float32 inputs)
            del logits
            z_target = z.gather(1, target).squeeze(1)  # [C]
            top = z.amax(dim=1, keepdim=True)  # [C, 1]
            z.sub_(top).exp_()  # in place: exp(logits - max)
            norm = z.sum(dim=1, keepdim=True)  # [C, 1]
            lse = (top + norm.log()).squeeze(1)  # [C]
            zero = torch.zeros((), device=z.device)
            loss += torch.where(keep, lse - z_target, zero).sum()
            if not (need_h or need_w or need_b):
                del z  # before the next chunk's buffers
                continue
            # softmax, 0 on ignored rows: in place in float32, else written once into the bf16 gradient
            scale = torch.where(keep[:, None], norm.reciprocal(), zero)  # [C, 1]
            grad = z.mul_(scale) if z.dtype == dtype else torch.mul(z, scale, out=torch.empty_like(z, dtype=dtype))
            del z
            # - one_hot, from the float32 log-probability: p - 1 = expm1(log p), exact even for p near 1
            at_target = torch.where(keep, torch.expm1(z_target - lse), zero)  # [C]
            grad.scatter_(1, target, at_target[:, None].to(dtype))
            grad_hidden, grad_weight = _chunk_grads(grad, h, weight, need_w, grad_hidden, grad_weight, grad_bias, start)
            del grad  # freed before the next chunk allocates its logits: one chunk's buffers at a time
        ctx.save_for_backward(total, grad_hidden, grad_weight, grad_bias)
        ctx.has = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.used = False
        z_loss = z_sum / z_total
        ctx.mark_non_differentiable(z_loss)
        if z_coef is not None:  # its gradient is in the rows' (2 lse p * z_coef * total / z_total)
            return loss / total + z_coef * z_loss, z_loss
        return loss / total, z_loss

    @staticmethod
    def backward(ctx, grad_loss, grad_z_loss):
        # the gradients were computed in forward; scale them in place (so backward runs once per forward)
        if ctx.used:
            raise RuntimeError("the fused linear cross-entropy computes its gradients once: backward ran twice")
        ctx.used = True
        total, grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        need_h, need_w, need_b = ctx.has
        # no kept token: every gradient is 0 (HF's too), and stays 0 rather than 0 * inf
        scale = torch.where(total > 0, grad_loss.float() / total, torch.zeros((), device=grad_loss.device))
        return (
            grad_hidden.mul_(scale.to(grad_hidden.dtype)) if need_h else None,
            grad_weight.mul_(scale).to(ctx.dtypes[0]) if need_w else None,
            grad_bias.mul_(scale).to(ctx.dtypes[1]) if need_b else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def fused_causal_lm_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias,
    labels: torch.Tensor,
    chunk: int | None = None,
    num_items_in_batch=None,
    label_smoothing: float = 0.0,
    class_weight=None,
    z_coef=None,
    softcap=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`causal_lm_loss(hidden @ weight.T + bias, labels, label_smoothing=, weight=)` + `z_coef` times the z-loss,
    the z-loss) without materializing the logits; the z-loss is 0 when `z_coef` is None. `softcap`: the losses
    are of the soft-capped logits cap * tanh((hidden @ weight.T + bias) / cap) (Gemma 2's final cap).

    `chunk`: tokens per chunk; None picks `default_chunk(tokens, vocab, hidden_size, dtype, softcap)`."""
    # hidden: [B, T, H]; labels: [B, T]
    labels = _shift(labels).reshape(-1).to(hidden.device)  # [B*T]
    flat = hidden.reshape(-1, hidden.shape[-1])  # [B*T, H]
    if chunk is None:
        chunk = default_chunk(flat.shape[0], weight.shape[0], weight.shape[1], weight.dtype, softcap is not None)
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: the fused loss needs at least one token per chunk")
    class_weight = class_weights(class_weight, weight.shape[0], hidden.device)
    return FusedLinearCrossEntropy.apply(
        flat, weight, bias, labels, chunk, num_items_in_batch, label_smoothing, class_weight, z_coef, softcap
    )


def fused_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias,
    labels: torch.Tensor,
    chunk: int | None = None,
    num_items_in_batch=None,
    softcap=None,
) -> torch.Tensor:
    """`causal_lm_loss(hidden @ weight.T + bias, labels)` without materializing the logits; `softcap`: of
    cap * tanh(logits / cap).

    `chunk`: tokens per chunk; None picks `default_chunk(tokens, vocab, hidden_size, dtype, softcap)`."""
    return fused_causal_lm_losses(hidden, weight, bias, labels, chunk, num_items_in_batch, softcap=softcap)[0]


def benchmark_fused_loss(
    tokens: int = 8192,
    hidden_size: int = 896,
    vocab: int = 151936,
    dtype: torch.dtype = torch.bfloat16,
    device=None,
    chunk: int | None = None,
    repeats: int = 5,
    unfused: bool = True,
    softcap: float | None = None,
) -> dict:
    """Time forward + backward of the fused loss (and of `causal_lm_loss` on materialized logits, as HF eager)
    at one shape; defaults are Qwen2-0.5B's head at 8192 tokens (`softcap`: Gemma 2's final soft-cap on
    both). Returns milliseconds (best of `repeats` after one warm-up), the chunk used, and on CUDA the peak
    memory each allocated beyond its inputs."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(1, tokens, hidden_size, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.02).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
    used = chunk or default_chunk(tokens, vocab, hidden_size, dtype, softcap is not None)
    runs = {"fused": lambda: fused_causal_lm_loss(hidden, weight, None, labels, chunk=used, softcap=softcap)}
    if unfused:
        capped = (lambda x: softcap * torch.tanh(x / softcap)) if softcap is not None else (lambda x: x)
        runs["unfused"] = lambda: causal_lm_loss(capped(hidden @ weight.T), labels)
    result = {"tokens": tokens, "hidden_size": hidden_size, "vocab": vocab, "dtype": str(dtype), "chunk": used}
    result["softcap"] = softcap
    for name, run in runs.items():
        best, peak, loss = float("inf"), None, None
        for i in range(repeats + 1):
            hidden.grad = weight.grad = None
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            loss = run()
            loss.backward()
            if cuda:
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) - base
            if i:  # the first run warms up (allocator, kernels)
                best = min(best, time.perf_counter() - start)
        result[f"{name}_ms"] = best * 1e3
        result[f"{name}_peak_bytes"] = peak
        result[f"{name}_loss"] = loss.item()
    return result
