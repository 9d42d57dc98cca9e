"""Read and write Hugging Face safetensors checkpoints, applying the spec's layout rules.

Loading consumes every checkpoint key exactly once and fills every parameter exactly once; anything
else is reported in one `CheckpointError` that names each tensor with its shape. Pickle checkpoints
(`.bin`, `.pt`) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


class CheckpointError(Exception):
    """A checkpoint folder that does not fit the model; the message lists every problem."""


def _pattern(p: str) -> re.Pattern:
    return re.compile("^" + re.escape(p).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def _fill(p: str, i: str | None) -> str:
    return p.replace("{i}", i) if i is not None else p


def _shape(t) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


class CheckpointReader:
    """The tensors of a folder's model.safetensors, or of the shards its index names."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {self.folder}")
        index = self.folder / SAFETENSORS_INDEX
        single = self.folder / SAFETENSORS
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [SAFETENSORS]
        else:
            pickles = [n for n in PICKLE_NAMES if (self.folder / n).exists()]
            pickles += sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pt"))
            if pickles:
                raise CheckpointError(
                    f"{self.folder}: only pickle checkpoints found ({', '.join(sorted(set(pickles)))}); they are refused "
                    "because unpickling can run arbitrary code. Convert them to safetensors first, e.g. "
                    "`transformers` AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)."
                )
            raise CheckpointError(f"{self.folder}: no {SAFETENSORS} or {SAFETENSORS_INDEX}")
        self.handles = {}
        self.location: dict[str, str] = {}
        for name in files:
            path = self.folder / name
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
                keys = list(handle.keys())
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{path}: cannot read safetensors file, it is truncated or corrupt ({e})") from None
            self.handles[name] = handle
            for k in keys:
                self.location[k] = name

        self.renamed: dict[str, str] = {}  # key as the model names it -> key in the file

    def keys(self) -> list[str]:
        return [k for k in self.location if k not in set(self.renamed.values())] + list(self.renamed)

    def align_prefix(self, wanted) -> str | None:
        """Add or strip a base-model prefix (`transformer.`, `bert.`) when that makes more keys fit.

        Hub files saved from a base model (GPT2Model) lack the prefix the task model's names carry;
        files saved from a task model (BertForPreTraining) carry one a base model lacks. `wanted(key)`
        says whether the model takes a key. Returns the change made, for messages, or None.
        """
        keys = list(self.location)
        best, best_score = None, sum(map(wanted, keys))
        firsts = {k.split(".", 1)[0] for k in keys}
        candidates = [("add", p) for p in wanted.prefixes] + [("strip", p) for p in firsts]
        for how, p in candidates:
            mapped = {(f"{p}.{k}" if how == "add" else k[len(p) + 1:]): k for k in keys
                      if how == "add" or k.startswith(p + ".")}
            score = sum(map(wanted, mapped))
            if score > best_score:
                best, best_score = (how, p, mapped), score
        if best is None:
            return None
        how, p, mapped = best
        self.renamed = {new: old for new, old in mapped.items() if new != old}
        return f"{'added' if how == 'add' else 'stripped'} the prefix `{p}.`"

    def get(self, key: str) -> torch.Tensor:
        key = self.renamed.get(key, key)
        try:
            return self.handles[self.location[key]].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.folder / self.location[key]}: tensor `{key}` cannot be read ({e})") from None


def _apply(transforms, tensors: list[torch.Tensor], target_shapes: list[tuple]) -> list[torch.Tensor]:
    for name, kw in transforms:
        if name == "transpose":
            tensors = [t.transpose(0, 1) if t.dim() == 2 else t for t in tensors]
        elif name == "concat":
            tensors = [torch.cat(tensors, dim=kw.get("dim", 0))]
        elif name == "split":
            dim = kw.get("dim", 0)
            sizes = [s[dim] if len(s) > dim else s[0] for s in target_shapes]
            (t,) = tensors
            if t.shape[dim] != sum(sizes):
                raise CheckpointError(f"cannot split {_shape(t)} along dim {dim} into {sizes}")
            tensors = list(torch.split(t, sizes, dim=dim))
    return [t.contiguous() for t in tensors]


def _invert(transforms, tensor: torch.Tensor) -> torch.Tensor:
    """Undo a one-to-one rule's transforms (only `transpose` keeps one tensor one tensor)."""
    for name, _ in reversed(transforms):
        if name == "transpose" and tensor.dim() == 2:
            tensor = tensor.transpose(0, 1)
    return tensor


def read_state(reader: CheckpointReader, params: dict[str, torch.Size], rules: list[dict], ignored: list[str],
               tied: dict[str, str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map checkpoint tensors to parameter names. Returns (tensors, problems)."""
    patterns = [_pattern(src) for rule in rules for src in rule["sources"]] + [_pattern(p) for p in ignored]

    def wanted(key: str) -> bool:
        return key in params or key in tied or any(p.match(key) for p in patterns)

    wanted.prefixes = sorted({name.split(".", 1)[0] for name in params if "." in name})
    reader.align_prefix(wanted)
    keys = set(reader.keys())
    consumed: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for rule in rules:
        first = _pattern(rule["sources"][0])
        for key in sorted(keys):
            m = first.match(key)
            if not m:
                continue
            i = m.groupdict().get("i")
            sources = [_fill(s, i) for s in rule["sources"]]
            targets = [_fill(t, i) for t in rule["targets"]]
            missing = [s for s in sources if s not in keys]
            if missing:
                problems.append(f"checkpoint lacks {', '.join(missing)} (needed with `{key}`)")
                continue
            unknown = [t for t in targets if t not in params]
            if unknown:
                problems.append(f"layout rule targets unknown parameter(s) {', '.join(unknown)}")
                continue
            try:
                tensors = _apply(rule["transforms"], [reader.get(s) for s in sources], [params[t] for t in targets])
            except CheckpointError as e:
                problems.append(f"`{key}`: {e}")
                continue
            consumed.update(sources)
            out.update(zip(targets, tensors))
    ignore = [_pattern(p) for p in ignored]
    for key in sorted(keys - consumed):
        if key in tied:  # a tied copy saved alongside its source: it must equal the source
            consumed.add(key)
            source = tied[key]
            if source in keys and not torch.equal(reader.get(key), reader.get(source)):
                problems.append(
                    f"`{key}` and `{source}` differ in the checkpoint, but the config ties them: set "
                    f"tie_word_embeddings (or the spec's tie condition) to false in config.json to load both"
                )
        elif key in params and key not in out:
            out[key] = reader.get(key)
            consumed.add(key)
        elif any(p.match(key) for p in ignore):
            consumed.add(key)
    for key in sorted(keys - consumed):
        t = reader.get(key)
        problems.append(f"unexpected checkpoint tensor `{key}` {_shape(t)}: no parameter of the model takes it")
    for name, shape in params.items():
        if name in tied:
            continue
        if name not in out:
            problems.append(f"parameter `{name}` [{', '.join(map(str, shape))}] is not in the checkpoint")
        elif tuple(out[name].shape) != tuple(shape):
            problems.append(
                f"shape mismatch for `{name}`: checkpoint has {_shape(out[name])}, "
                f"the model expects [{', '.join(map(str, shape))}]"
            )
    return out, problems


def write_state(state: dict[str, torch.Tensor], rules: list[dict], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """Parameter tensors -> checkpoint tensors, under the model's own parameter names (which are Hugging
    Face's); tied copies left out, as HF does.

    A rule that keeps a tensor's name (GPT-2's Conv1D `transpose`) is the checkpoint format of that tensor and
    is applied in reverse. A rule that renames (split, concat, another key layout) describes a foreign
    checkpoint that loading translates from; saving writes the model's names, which is what HF loads."""
    state = {k: v for k, v in state.items() if k not in tied}
    out = dict(state)
    for rule in rules:
        if rule["sources"] != rule["targets"]:
            continue
        first = _pattern(rule["targets"][0])
        for name in sorted(state):
            if first.match(name):
                out[name] = _invert(rule["transforms"], state[name])
    return {k: v.detach().contiguous() for k, v in sorted(out.items())}
