"""Read and write Hugging Face safetensors checkpoints, applying the spec's layout rules.

Loading consumes every checkpoint key exactly once and fills every parameter exactly once; anything
else is reported in one `CheckpointError` that names each tensor with its shape. Pickle checkpoints
(`.bin`, `.pt`) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path, PurePosixPath

import torch

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


class CheckpointError(ValueError):
    """A checkpoint folder that does not fit the model; the message lists every problem."""


# safetensors' dtype names -> torch's; a parameter that wants a float takes the four float dtypes only
ST_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
    "C128": "complex128",
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _pattern(p: str) -> re.Pattern:
    """`{i}` (a layer index) and `{j}` (an expert index) match digits."""
    return re.compile("^" + re.escape(p).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)") + "$")


def key_matches(pattern: str, key: str) -> bool:
    """Whether checkpoint `key` is an instance of a rule's `pattern` (`layers.{i}.attention.wq.weight`)."""
    return _pattern(pattern).match(key) is not None


def _fill(p: str, i: str | None, j: int | None = None) -> str:
    p = p.replace("{i}", i) if i is not None else p
    return p.replace("{j}", str(j)) if j is not None else p


def _shape(t) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def read_json(path: Path, error=None):
    """A JSON file's value; a file that is not a regular file, not UTF-8, not JSON or nested too deeply is `error`
    (CheckpointError by default) naming the path. Never opens a FIFO or a device."""
    error = error or CheckpointError
    if not path.is_file():  # follows symlinks; False for a FIFO, a device or a folder: never opened
        raise error(f"{path} is not a regular file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply") from None
    except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise error(f"{path}: not valid JSON ({e})") from None


def _hub_blobs(folder: Path) -> Path | None:
    """The Hugging Face cache keeps files in `<repo>/blobs/` and links `<repo>/snapshots/<rev>/<name>` to them."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent / "blobs"
    return None


def shard_path(folder: Path, name, index: Path) -> Path:
    """The file an index entry names: a relative path inside the folder (`..`, absolute paths and links out of it
    refused; a link into the Hugging Face cache's blobs is allowed) that is a regular file (never opened before
    that is known, so a FIFO cannot block)."""
    where = f"{index}: shard {name!r}"
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: a shard must be named by a non-empty string (a file name in {folder})")
    if "\x00" in name or "\\" in name:
        raise CheckpointError(f"{where}: a shard name holds a NUL byte or a backslash; rewrite the index")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise CheckpointError(
            f"{where}: a shard must be a relative path inside {folder}, without `..` or a leading `/`; "
            "rewrite the index with the shards' file names"
        )
    path = folder / pure
    real = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(folder)), _hub_blobs(folder)]
    if not any(root is not None and (real == root or root in real.parents) for root in roots):
        raise CheckpointError(f"{where} links to {real}, outside {folder}; copy the shard into the folder")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{where}: {path} is missing") from None
    except OSError as e:
        raise CheckpointError(f"{where}: {path} cannot be read ({e})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{where}: {path} is not a regular file")
    return path


class CheckpointReader:
    """The tensors of a folder's model.safetensors, or else of the shards its index names (the single file wins
    when both are present, as in transformers)."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {self.folder}")
        index = self.folder / SAFETENSORS_INDEX
        single = self.folder / SAFETENSORS
        if single.is_file():
            paths = {SAFETENSORS: single}
        elif index.is_file():
            paths = self._shards(index)
        elif single.exists() or index.exists():
            raise CheckpointError(f"{single if single.exists() else index} is not a regular file")
        else:
            pickles = [n for n in PICKLE_NAMES if (self.folder / n).exists()]
            pickles += sorted(p.name for p in self.folder.glob("*.bin")) + sorted(
                p.name for p in self.folder.glob("*.pt")
            )
            if pickles:
                raise CheckpointError(
                    f"{self.folder}: only pickle checkpoints found ({', '.join(sorted(set(pickles)))}); they are refused "
                    "because unpickling can run arbitrary code. Convert them to safetensors first, e.g. "
                    "`transformers` AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)."
                )
            raise CheckpointError(f"{self.folder}: no {SAFETENSORS} or {SAFETENSORS_INDEX}")
        self.handles = {}
        self.location: dict[str, str] = {}
        for name, path in paths.items():
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
                keys = list(handle.keys())
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(
                    f"{path}: cannot read safetensors file, it is truncated or corrupt ({e})"
                ) from None
            self.handles[name] = handle
            for k in keys:
                if k in self.location:
                    raise CheckpointError(
                        f"tensor `{k}` is in both {self.location[k]} and {name}; keep it in one shard"
                    )
                self.location[k] = name

        self.renamed: dict[str, str] = {}  # key as the model names it -> key in the file

    def _shards(self, index: Path) -> dict[str, Path]:
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(
                f"{index}: not a safetensors index: it must be a JSON object whose `weight_map` maps each tensor "
                "name to its shard's file name"
            )
        bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
        if bad:
            raise CheckpointError(f"{index}: `weight_map` entry `{bad[0]}` is {weight_map[bad[0]]!r}, not a file name")
        return {name: shard_path(self.folder, name, index) for name in sorted(set(weight_map.values()))}

    def header(self, key: str) -> tuple[str, list[int]]:
        """(safetensors dtype name, shape) of a tensor, from the file's header: nothing is read."""
        key = self.renamed.get(key, key)
        view = self.handles[self.location[key]].get_slice(key)
        return view.get_dtype(), list(view.get_shape())

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
            mapped = {
                (f"{p}.{k}" if how == "add" else k[len(p) + 1 :]): k
                for k in keys
                if how == "add" or k.startswith(p + ".")
            }
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


def bind_rules(rules: list[dict], config) -> list[dict]:
    """The layout rules with options that name a config field (`{"config": "num_attention_heads"}`) read from
    `config`: a rule holds for every config of the spec."""

    def bind(value):
        return getattr(config, value["config"]) if isinstance(value, dict) and "config" in value else value

    return [
        {**rule, "transforms": [(name, {k: bind(v) for k, v in kw.items()}) for name, kw in rule["transforms"]]}
        for rule in rules
    ]


def _permute(t: torch.Tensor, heads: int, to_halves: bool) -> torch.Tensor:
    """Rotary rows per head: Meta's interleaved pairs (x0, y0, x1, y1, ...) <-> Hugging Face's halves
    (x0, x1, ..., y0, y1, ...), as transformers' convert_llama_weights_to_hf permutes q and k."""
    rows, rest = t.shape[0], t.shape[1:]
    if rows % (2 * heads):
        raise CheckpointError(f"cannot permute {_shape(t)} over {heads} heads: {rows} rows are not 2 x heads x n")
    pairs = rows // heads // 2
    grouped = (heads, pairs, 2, *rest) if to_halves else (heads, 2, pairs, *rest)
    return t.reshape(grouped).transpose(1, 2).reshape(t.shape)


def _apply(transforms, tensors: list, target_shapes: list[tuple]) -> list[torch.Tensor]:
    """The rule's transforms over its source tensors (for a `stack` rule, each source a list over experts)."""
    for name, kw in transforms:
        if name == "stack":
            shapes = {tuple(t.shape) for experts in tensors for t in experts}
            if len(shapes) > 1:
                raise CheckpointError(f"cannot stack experts of different shapes {sorted(map(list, shapes))}")
            tensors = [torch.stack(experts, dim=kw.get("dim", 0)) for experts in tensors]
        elif name == "transpose":
            tensors = [t.transpose(0, 1) if t.dim() == 2 else t for t in tensors]
        elif name == "permute":
            tensors = [_permute(t, kw["heads"], to_halves=True) for t in tensors]
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


def _invert(transforms, tensors: list[torch.Tensor], n_sources: int) -> list:
    """Undo a rule's transforms: parameter tensors -> its source tensors (for a `stack` rule, each source a list
    over experts). A `concat` is undone into equal parts."""
    for name, kw in reversed(transforms):
        dim = kw.get("dim", 0)
        if name == "transpose":
            tensors = [t.transpose(0, 1) if t.dim() == 2 else t for t in tensors]
        elif name == "permute":
            tensors = [_permute(t, kw["heads"], to_halves=False) for t in tensors]
        elif name == "concat":
            (t,) = tensors
            if t.shape[dim] % n_sources:
                raise CheckpointError(f"cannot write {_shape(t)} back as {n_sources} equal parts along dim {dim}")
            tensors = list(t.chunk(n_sources, dim=dim))
        elif name == "split":
            tensors = [torch.cat(tensors, dim=dim)]
        elif name == "stack":
            tensors = [list(t.unbind(dim)) for t in tensors]
    return tensors


def _dtype_problem(reader: CheckpointReader, key: str, param: str, want: torch.dtype | None) -> str | None:
    """Why the checkpoint tensor `key` cannot fill `param` (a float parameter takes the four float dtypes,
    another one its own dtype), from the header alone; None when it can."""
    if want is None:
        return None
    try:
        st_dtype, _ = reader.header(key)
    except Exception:  # reading the tensor reports it
        return None
    name = ST_DTYPES.get(st_dtype, st_dtype.lower())
    if want.is_floating_point:
        if name in FLOAT_DTYPES:
            return None
        takes = f"a floating-point tensor ({', '.join(FLOAT_DTYPES)})"
    else:
        takes = str(want).removeprefix("torch.")
        if name == takes:
            return None
    return (
        f"tensor `{key}` in {reader.location[reader.renamed.get(key, key)]} is {name}, but parameter `{param}` "
        f"takes {takes}: convert the checkpoint (e.g. `.to(torch.float32)` each tensor) and save it again"
    )


def read_state(
    reader: CheckpointReader,
    params: dict[str, torch.Size],
    rules: list[dict],
    ignored: list[str],
    tied: dict[str, str],
    dtypes: dict[str, torch.dtype] | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map checkpoint tensors to parameter names. Returns (tensors, problems). `dtypes`: each parameter's dtype,
    for refusing tensors of another kind (an int16 or bool tensor for a float weight) before reading them."""
    dtypes = dtypes or {}
    patterns = [_pattern(src) for rule in rules for src in rule["sources"]] + [_pattern(p) for p in ignored]

    def wanted(key: str) -> bool:
        return key in params or key in tied or any(p.match(key) for p in patterns)

    wanted.prefixes = sorted({name.split(".", 1)[0] for name in params if "." in name})
    reader.align_prefix(wanted)
    keys = set(reader.keys())
    consumed: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    refused: set[str] = set()  # parameters whose tensor has the wrong dtype (reported once, not as missing)
    for rule in rules:
        first = _pattern(rule["sources"][0])
        matches: dict[str | None, list[int]] = {}  # layer index -> the expert indices found (one entry without {j})
        for key in sorted(keys):
            m = first.match(key)
            if m:
                found = m.groupdict()
                matches.setdefault(found.get("i"), []).append(int(found["j"]) if "j" in found else -1)
        for i, experts in sorted(matches.items(), key=lambda kv: (kv[0] is None, int(kv[0] or 0))):
            stacked = "{j}" in rule["sources"][0]
            experts = sorted(experts) if stacked else [None]
            key = _fill(rule["sources"][0], i, experts[0])
            if stacked and experts != list(range(len(experts))):
                gaps = sorted(set(range(max(experts) + 1)) - set(experts))
                problems.append(
                    f"`{_fill(rule['sources'][0], i)}`: the experts must be numbered 0 to {max(experts)}, "
                    f"but {', '.join(map(str, gaps))} {'is' if len(gaps) == 1 else 'are'} missing"
                )
                consumed.update(_fill(rule["sources"][0], i, j) for j in experts)
                continue
            per_source = [[_fill(s, i, j) for j in experts] for s in rule["sources"]]
            sources = [k for ks in per_source for k in ks]
            targets = [_fill(t, i) for t in rule["targets"]]
            missing = [s for s in sources if s not in keys]
            if missing:
                problems.append(f"checkpoint lacks {', '.join(missing)} (needed with `{key}`)")
                continue
            unknown = [t for t in targets if t not in params]
            if unknown:
                problems.append(f"layout rule targets unknown parameter(s) {', '.join(unknown)}")
                continue
            wants = [dtypes.get(t) for t in targets]
            want = next((w for w in wants if w is not None and w.is_floating_point), wants[0])
            bad = [p for p in (_dtype_problem(reader, s, targets[0], want) for s in sources) if p]
            if bad:
                consumed.update(sources)
                refused.update(targets)
                problems.extend(bad)
                continue
            try:
                read = [[reader.get(k) for k in ks] for ks in per_source]
                tensors = _apply(
                    rule["transforms"], read if stacked else [r[0] for r in read], [params[t] for t in targets]
                )
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
            consumed.add(key)
            bad = _dtype_problem(reader, key, key, dtypes.get(key))
            if bad:
                refused.add(key)
                problems.append(bad)
                continue
            out[key] = reader.get(key)
        elif any(p.match(key) for p in ignore):
            consumed.add(key)
    for key in sorted(keys - consumed):
        try:
            shape = "[" + ", ".join(map(str, reader.header(key)[1])) + "]"
        except Exception:
            shape = _shape(reader.get(key))
        problems.append(f"unexpected checkpoint tensor `{key}` {shape}: no parameter of the model takes it")
    for name, shape in params.items():
        if name in tied or name in refused:
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

    The rules of the spec's `checkpoint:` section are Hugging Face's own format (GPT-2's Conv1D `transpose`,
    Mixtral's per-expert tensors `stack`ed into one parameter) and are applied in reverse, so the files hold
    what transformers saves. A named section (`checkpoint "meta":`) describes a foreign layout that loading
    translates from; saving writes the model's names for it, which is what HF loads."""
    state = {k: v for k, v in state.items() if k not in tied}
    out = dict(state)
    written: dict[str, torch.Tensor] = {}
    for rule in rules:
        if not rule.get("save", rule["sources"] == rule["targets"]):
            continue
        first = _pattern(rule["targets"][0])
        for name in sorted(state):
            m = first.match(name)
            targets = [_fill(t, m.groupdict().get("i")) for t in rule["targets"]] if m else []
            if not m or not all(t in state for t in targets):
                continue
            i = m.groupdict().get("i")
            tensors = _invert(rule["transforms"], [state[t].detach() for t in targets], len(rule["sources"]))
            for t in targets:
                out.pop(t, None)
            for source, value in zip(rule["sources"], tensors):
                if isinstance(value, list):  # one tensor per expert: their own storage (safetensors refuses views)
                    written.update((_fill(source, i, j), v.clone()) for j, v in enumerate(value))
                else:
                    written[_fill(source, i)] = value.clone()
    out.update(written)
    return {k: v.detach().contiguous() for k, v in sorted(out.items())}


SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
SIZE_UNITS = {
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size) -> int:
    """Bytes in `size`: an int, or a string as Hugging Face writes them ("5GB" = 5 * 10^9, "500MB", "2GiB")."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", size) if isinstance(size, str) else None
    if m is None or m.group(2).upper() not in SIZE_UNITS or float(m.group(1)) <= 0:
        raise ValueError(
            f"max_shard_size must be a number of bytes (int > 0) or a size such as '5GB', '500MB', '2GiB', got {size!r}"
        )
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


def shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors split into shards of at most `max_bytes` in order, as huggingface_hub's
    `split_torch_state_dict_into_shards` (a tensor larger than that gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], max_shard_size="50GB") -> list[str]:
    """Write `model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when the
    tensors exceed `max_shard_size`, as transformers' save_pretrained; the weight files of an earlier save that
    this one does not rewrite are removed (a stale `model.safetensors` would win over the new index). Returns
    the file names written."""
    from safetensors.torch import save_file

    shards = shard(tensors, parse_size(max_shard_size))
    names = (
        [SAFETENSORS]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    for name, part in zip(names, shards):
        save_file({k: v.cpu() for k, v in part.items()}, str(folder / name), metadata={"format": "pt"})
    written = list(names)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: name for name, part in zip(names, shards) for k in part},
        }
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(SAFETENSORS_INDEX)
    for old in folder.iterdir():
        stale = old.name in (SAFETENSORS, SAFETENSORS_INDEX) or SHARD_NAME.match(old.name)
        if stale and old.name not in written and (old.is_file() or old.is_symlink()):
            old.unlink()
    return written
