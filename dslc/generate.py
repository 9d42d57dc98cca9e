"""`dslc generate`: build (or reuse a cached build), load a checkpoint folder, stream generated text."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import time
from pathlib import Path

from dslc.diagnostics import DslcError


class GenerateError(Exception):
    """A problem with the inputs of `dslc generate`, with the fix in the message."""


def _cache_root(build_dir: str | None) -> Path:
    if build_dir:
        return Path(build_dir)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dslc"


def compiler_fingerprint() -> bytes:
    """A hash of dslc's own code, grammar, standard library and templates: a cached build is reused only
    when both the spec and the compiler that would build it are unchanged."""
    from dslc import __version__
    from dslc.resources import grammar_path, templates_dir

    h = hashlib.sha256(__version__.encode())
    package = Path(__file__).resolve().parent
    roots = [package, grammar_path("model.lark").parent, templates_dir()]
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".lark", ".model", ".j2")):
            h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.digest()


def cached_build(spec: Path, build_dir: str | None):
    """Import the package built from `spec`, building it first unless an identical build is cached."""
    from dslc.build import build

    digest = hashlib.sha256(spec.read_bytes() + compiler_fingerprint()).hexdigest()[:12]
    name = f"{spec.stem.replace('-', '_').replace('.', '_')}_{digest}"
    root = _cache_root(build_dir)
    built = root / name / "build.json"
    reused = built.is_file()
    if not reused:
        build(spec, root, name=name)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(name), reused


def _check_folder(weights: Path) -> Path:
    if not weights.is_dir():
        raise GenerateError(f"weights folder not found: {weights}")
    if not (weights / "config.json").is_file():
        raise GenerateError(f"{weights} has no config.json: pass a Hugging Face checkpoint folder")
    tok = weights / "tokenizer.json"
    if not tok.is_file():
        raise GenerateError(
            f"{weights} has no tokenizer.json: `dslc generate` tokenizes with the folder's own tokenizer "
            "(save one with `tokenizer.save_pretrained(folder)` in transformers or `Tokenizer.save` in tokenizers)"
        )
    return tok


def _eos_ids(weights: Path, tokenizer) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = weights / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                ids += value if isinstance(value, list) else [value]
                break
    if not ids:
        for token in ("<|endoftext|>", "</s>", "<eos>"):
            tid = tokenizer.token_to_id(token)
            if tid is not None:
                ids.append(tid)
                break
    return ids


def generate_command(args) -> int:
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    spec = Path(args.file)
    weights = Path(args.weights)
    try:
        tok_path = _check_folder(weights)
        start = time.perf_counter()
        pkg, reused = cached_build(spec, args.build_dir)
        console.print(f"[dim]{'reused' if reused else 'built'} {pkg.__name__} in {time.perf_counter() - start:.2f} s[/dim]")
    except GenerateError as e:
        console.print(f"[red]error[/red]: {e}")
        return 2
    except DslcError:
        raise
    import torch
    from tokenizers import Tokenizer

    model_cls = next(getattr(pkg, n) for n in pkg.__all__ if hasattr(getattr(pkg, n), "from_pretrained")
                     and hasattr(getattr(pkg, n), "generate"))
    try:
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype or "float32"]
    except KeyError:
        console.print(f"[red]error[/red]: unknown --dtype {args.dtype!r}; use float32, bfloat16 or float16")
        return 2
    start = time.perf_counter()
    try:
        model = model_cls.from_pretrained(weights, dtype=dtype, device=args.device)
    except (pkg.ConfigError, pkg.CheckpointError) as e:
        console.print(f"[red]error[/red]: {weights} does not fit {spec.name}: {e}")
        return 2
    load_s = time.perf_counter() - start
    tokenizer = Tokenizer.from_file(str(tok_path))
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        bos = tokenizer.token_to_id("<|endoftext|>")
        ids = [bos if bos is not None else 0]
    input_ids = torch.tensor([ids], device=args.device)
    generator = torch.Generator(device=input_ids.device).manual_seed(args.seed)
    out_ids: list[int] = []
    printed = ""

    def stream(token: torch.Tensor) -> None:
        nonlocal printed
        out_ids.append(int(token[0]))
        text = tokenizer.decode(out_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    sys.stdout.write(args.prompt)
    start = time.perf_counter()
    model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   eos_token_id=_eos_ids(weights, tokenizer), generator=generator, streamer=stream)
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    n = len(out_ids)
    console.print(f"[dim]{n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tokens/s); "
                  f"loaded {model.num_parameters():,} parameters in {load_s:.2f} s[/dim]")
    return 0
