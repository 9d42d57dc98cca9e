"""Continuous batching: one thread owns the model and a SlotDecoder (the generated package's serving.py).

Each loop: admit queued requests into free slots (one prefill each, which also picks its first token), then
run one decode step for every slot below the highest busy one, pick each busy slot's next token with its
own sampling settings, and free the slots whose sequence finished (EOS, max_tokens, the context's end) or
whose client went away (`cancel`). Events go to each request's `emit` callable, from the scheduler thread.
"""

from __future__ import annotations

import collections
import importlib
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


class QueueFull(Exception):
    """More requests are waiting than the queue bound allows."""


class ShuttingDown(Exception):
    """The scheduler no longer admits requests."""


@dataclass
class Sampling:
    """One request's decoding settings: greedy when temperature is 0."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None


@dataclass
class Request:
    """A prompt's token ids and settings; `emit(kind, value)` receives ("token", id), ("done", reason) or
    ("error", message), exactly one of the last two, last."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[str, object], None]
    cancelled: bool = False
    generated: int = 0
    slot: int | None = None
    position: int = 0  # the position of `token` in the slot
    token: int = 0  # the last token, fed to the next decode step
    generator: object = field(default=None, repr=False)


def pick(warp, logits, sampling: Sampling, generator) -> list[int]:
    """[B, V] logits -> the next tokens: argmax for temperature 0, else sampled after `warp` (the package's
    generation._warp: temperature, top-k, top-p in Hugging Face's order)."""
    import torch

    scores = logits.float()
    if sampling.temperature == 0:
        return scores.argmax(-1).tolist()
    probs = warp(scores, sampling.temperature, sampling.top_k, sampling.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()


class Scheduler:
    """The serving loop over `slots` sequences of at most `max_len` tokens each (see the module docstring)."""

    def __init__(self, model, slots: int, max_len: int, eos: list[int], max_queue: int = 64):
        import torch

        self.torch = torch
        pkg = importlib.import_module(type(model).__module__.rpartition(".")[0])
        self.serving = importlib.import_module(pkg.__name__ + ".serving")
        self.generation = importlib.import_module(pkg.__name__ + ".generation")
        self.model, self.slots, self.max_len, self.max_queue = model, slots, max_len, max_queue
        self.eos = set(eos)
        self.decoder = self.serving.SlotDecoder(model, slots, max_len)
        self.queue: collections.deque[Request] = collections.deque()
        self.busy: list[Request | None] = [None] * slots
        self.cond = threading.Condition()
        self.stopping = False
        self.steps = 0  # decode steps run (each over every busy slot at once)
        self.peak = 0  # the most sequences one decode step ran
        self.cancelled = 0  # requests stopped because their client went away (or a stop string matched)
        self.thread = threading.Thread(target=self._loop, name="dslc-scheduler", daemon=True)
        self.thread.start()

    # ---- called from the server --------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue `request`; QueueFull past the bound, ShuttingDown once `stop` was called."""
        with self.cond:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are already waiting (the queue bound is {self.max_queue})")
            self.queue.append(request)
            self.cond.notify()

    def cancel(self, request: Request) -> None:
        """Stop `request` (its client went away): its slot is freed before the next step."""
        with self.cond:
            request.cancelled = True
            self.cond.notify()

    def stats(self) -> dict:
        with self.cond:
            busy = sum(r is not None for r in self.busy)
            return {
                "slots": self.slots,
                "busy_slots": busy,
                "queued": len(self.queue),
                "steps": self.steps,
                "peak_batch": self.peak,
                "cancelled": self.cancelled,
            }

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, fail the queued ones, let the running ones finish (up to `timeout` s)."""
        with self.cond:
            self.stopping = True
            while self.queue:
                self.queue.popleft().emit("error", "the server is shutting down")
            self.cond.notify()
        self.thread.join(timeout)
        with self.cond:
            for slot, request in enumerate(self.busy):
                if request is not None:
                    request.emit("error", "the server shut down before the request finished")
                    self.busy[slot] = None
        self.decoder.close()

    # ---- the scheduler thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.queue and not any(self.busy):
                    self.cond.wait()
                if self.stopping and not any(self.busy):
                    return
                self._drop_cancelled()
                admit = []
                while self.queue and None in self.busy:
                    request = self.queue.popleft()
                    if request.cancelled:
                        request.emit("done", "cancelled")
                        continue
                    slot = self.busy.index(None)
                    self.busy[slot] = request
                    request.slot = slot
                    admit.append(request)
            for request in admit:
                self._guard([request], self._prefill, request)
            with self.cond:
                self._drop_cancelled()
                running = [r for r in self.busy if r is not None]
            if running:
                self._guard(running, self._step, running)

    def _guard(self, requests: list[Request], work: Callable, arg) -> None:
        """Run `work(arg)`; an exception fails `requests` (and frees their slots), never the loop or others."""
        try:
            work(arg)
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the server
            with self.cond:
                for r in requests:
                    if r.slot is not None and self.busy[r.slot] is r:
                        self.busy[r.slot] = None
                        r.emit("error", f"generation failed: {type(e).__name__}: {e}")

    def _drop_cancelled(self) -> None:
        for slot, request in enumerate(self.busy):
            if request is not None and request.cancelled:
                self.busy[slot] = None
                self.cancelled += 1
                request.emit("done", "cancelled")

    def _prefill(self, request: Request) -> None:
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
        request.generator = self.torch.Generator(device=self.model.device).manual_seed(seed)
        logits = self.decoder.prefill(request.slot, request.prompt)
        request.position = len(request.prompt) - 1  # the last token fed so far
        self._advance(request, self._pick(request, logits[None])[0])

    def _step(self, running: list[Request]) -> None:
        torch = self.torch
        n = max(r.slot for r in running) + 1
        tokens = torch.zeros(n, dtype=torch.long)
        positions = torch.zeros(n, dtype=torch.long)
        for r in running:
            tokens[r.slot], positions[r.slot] = r.token, r.position
        device = self.model.device
        logits = self.decoder.step(tokens.to(device), positions.to(device))  # [n, V]
        self.steps += 1
        self.peak = max(self.peak, len(running))
        greedy = [r for r in running if r.sampling.temperature == 0]
        if greedy:
            rows = torch.tensor([r.slot for r in greedy], device=device)
            for r, t in zip(greedy, logits[rows].float().argmax(-1).tolist()):
                self._advance(r, t)
        for r in running:
            if r.sampling.temperature != 0:
                self._advance(r, self._pick(r, logits[r.slot : r.slot + 1])[0])

    def _pick(self, request: Request, logits) -> list[int]:
        return pick(self.generation._warp, logits, request.sampling, request.generator)

    def _advance(self, request: Request, token: int) -> None:
        """Record `token` for `request`: emit it, or finish on EOS / max_tokens / the cache's end."""
        with self.cond:
            if request.cancelled or self.busy[request.slot] is not request:
                return
            if token in self.eos:
                self._finish(request, "stop")
                return
            request.emit("token", token)
            request.generated += 1
            request.token, request.position = token, request.position + 1
            if request.generated >= request.sampling.max_tokens or request.position >= self.max_len:
                self._finish(request, "length")  # (a token at max_len could not be fed back)

    def _finish(self, request: Request, reason: str) -> None:
        self.busy[request.slot] = None
        request.emit("done", reason)
