"""Mixture-of-experts routing in plain PyTorch: each expert runs only on the tokens routed to it.

`dispatch` groups the top-k (token, expert) slots by expert, `grouped_linear` multiplies each group of rows by
its expert's slice of a stacked weight `[E, out, in]` (the layout transformers keeps in memory), `combine`
weights the expert rows by their routing weight and sums them back per token. Every step is differentiable by
autograd except the integer slot order and counts; gradients equal transformers' per-expert loop's.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F


def dispatch(x: torch.Tensor, experts: torch.Tensor, num_experts: int):
    """x [N, H], experts [N, K] -> (rows [N * K, H] grouped by expert, slots [N * K], counts [num_experts]).

    Slot `n * K + k` is token n's k-th choice; within an expert the slots keep their order (a stable sort), so
    each token's expert rows are summed in expert order, as transformers' loop over experts does."""
    flat = experts.reshape(-1)
    slots = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return x[slots // experts.shape[-1]], slots, counts


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [M, in] whose first counts[0] rows go to expert 0, the next counts[1] to expert 1, ...; weight [E, out,
    in] -> [M, out]. An expert that got no rows is not called."""
    sizes = counts.tolist()
    parts = x.split(sizes)
    experts = weight.unbind(0)  # one view per expert: backward stacks their gradients once (`weight[e]` would
    # give each expert's gradient as a zero-filled [E, out, in] tensor of its own)
    out = [F.linear(part, experts[e]) for e, part in enumerate(parts) if sizes[e]]
    return torch.cat(out) if out else x.new_zeros(0, weight.shape[1])


def combine(rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rows [N * K, H] in slot order `slots`, weights [N, K] -> [N, H]: sum over k of weight * row, each product
    taken in the wider dtype and rounded to the rows' (transformers' order)."""
    k = weights.shape[-1]
    scaled = (rows * weights.reshape(-1)[slots, None]).to(rows.dtype)
    out = rows.new_zeros(weights.shape[0], rows.shape[-1])
    return out.index_add(0, slots // k, scaled)


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over every layer's router logits [N, E] (as transformers' Mixtral and
    Qwen2-MoE): num_experts * sum over experts of (share of the top-k slots it got) * (its mean routing
    probability), both over every layer's tokens, padding (attention_mask 0) left out. Without routed layers
    (a config whose layers are all dense) there is nothing to balance: 0."""
    if not router_logits:
        return torch.zeros(())
    device = router_logits[0].device
    mask = attention_mask.reshape(-1, 1).to(device=device, dtype=torch.float32) if attention_mask is not None else None
    slots = probs = rows = 0.0
    for logits in router_logits:
        p = torch.softmax(logits.to(device), dim=-1)  # [N, E]
        chosen = torch.topk(p, top_k, dim=-1).indices  # [N, k]
        hits = F.one_hot(chosen, num_experts).sum(dim=1).to(torch.float32)  # [N, E]: slots each expert got
        if mask is not None:
            hits, p, n = hits * mask, p.float() * mask, mask.sum()
        else:
            n = p.shape[0]
        slots = slots + hits.sum(dim=0)
        probs = probs + p.float().sum(dim=0)
        rows = rows + n
    return torch.sum((slots / rows) * (probs / rows)) * num_experts


class RouterRecorder:
    """The router logits of one forward, read with forward hooks on the modules `pattern` names (`{i}` any
    layer index), in module order, each as [tokens, num_experts]."""

    def __init__(self, model: torch.nn.Module, pattern: str, num_experts: int):
        wanted = re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"\d+") + "$")
        self.modules = [m for name, m in model.named_modules() if wanted.match(name)]
        self.num_experts = num_experts
        self.logits: list[torch.Tensor] = []
        self.handles = []

    def __enter__(self) -> RouterRecorder:
        def record(module, args, output):
            self.logits.append(output.reshape(-1, self.num_experts))

        self.handles = [m.register_forward_hook(record) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
