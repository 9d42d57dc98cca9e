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
    config = weights / "config.json"
    if not config.is_file():  # is_file: False for a FIFO or a device, which are never opened
        raise GenerateError(
            f"{config} is not a regular file"
            if config.exists()
            else f"{weights} has no config.json: pass a Hugging Face checkpoint folder"
        )
    tok = weights / "tokenizer.json"
    if not tok.is_file():
        if tok.exists():
            raise GenerateError(f"{tok} is not a regular file: `dslc generate` reads the folder's tokenizer.json")
        raise GenerateError(
            f"{weights} has no tokenizer.json: `dslc generate` tokenizes with the folder's own tokenizer "
            "(save one with `tokenizer.save_pretrained(folder)` in transformers or `Tokenizer.save` in tokenizers)"
        )
    return tok


DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")  # int8 / int4: torchao weight-only (dslc/runtime.py)


def _check_args(args):
    """The command-line values, checked before anything is built or loaded; returns the torch device (or None)."""
    import math

    if args.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise GenerateError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.do_sample and args.temperature == 0:
        raise GenerateError(
            "--temperature 0 with --do-sample divides by zero: leave out --do-sample for greedy "
            "decoding, or give a temperature > 0"
        )
    if args.top_k is not None and args.top_k < 0:
        raise GenerateError(f"--top-k must be 0 (off) or more, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise GenerateError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.seed < 2**64:
        raise GenerateError(f"--seed must be in 0 .. 2**64 - 1, got {args.seed}")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise GenerateError(f"unknown --dtype {args.dtype!r}; use {', '.join(DTYPES)}")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerateError(
            f"--prompt is not valid UTF-8 (an undecodable byte at character {e.start}); pass the text in UTF-8"
        ) from None
    return _device(args.device)


def _device(name: str | None):
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise GenerateError(f"--device {name!r} is not a device ({e}); use cpu, cuda or cuda:N") from None
    if device.type == "meta":
        raise GenerateError("--device meta holds no data: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GenerateError(
                f"--device {name}: CUDA is not available here (this torch is {torch.__version__}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GenerateError(
                f"--device {name}: there are {torch.cuda.device_count()} CUDA devices "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as e:  # noqa: BLE001 - a backend that is not built in or not present
            raise GenerateError(f"--device {name} is not usable here ({e}); use --device cpu") from None
    return device


def _native(call, what: str):
    """Run a tokenizers call; its errors (a Rust panic is a BaseException) become a GenerateError naming `what`."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        raise GenerateError(f"{what}: {type(e).__name__}: {e}") from None


def _read_json(path: Path):
    if not path.is_file():
        raise GenerateError(f"{path} is not a regular file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise GenerateError(f"{path}: JSON nested too deeply") from None
    except (ValueError, OSError) as e:
        raise GenerateError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise GenerateError(f"{path}: must be a JSON object of keys and values, got {type(data).__name__}")
    return data


def _is_id(value, vocab: int | None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0 and (vocab is None or value < vocab)


def _special_ids(weights: Path, key: str, vocab: int | None) -> list[int]:
    """`key` (eos_token_id, bos_token_id) from generation_config.json, else config.json, as transformers reads
    it: an int or a list of ints inside the vocabulary, else a GenerateError naming the file."""
    for name in ("generation_config.json", "config.json"):
        path = weights / name
        if not path.exists():
            continue
        value = _read_json(path).get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not values or not all(_is_id(v, vocab) for v in values):
            raise GenerateError(
                f"{path}: {key} {value!r} is not a token id: give an int or a list of ints in "
                f"0 .. {vocab - 1 if vocab else 'vocab_size - 1'}" + (f" (vocab_size={vocab})" if vocab else "")
            )
        return values
    return []


def _eos_ids(weights: Path, tokenizer, vocab: int | None) -> list[int]:
    """EOS ids from generation_config.json, else config.json (as transformers), else the tokenizer's usual token."""
    ids = _special_ids(weights, "eos_token_id", vocab)
    if not ids:
        for token in ("<|endoftext|>", "</s>", "<eos>"):
            tid = tokenizer.token_to_id(token)
            if tid is not None and _is_id(tid, vocab):
                ids.append(tid)
                break
    return ids


def _context(config) -> tuple[str, int] | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def generate_command(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, soft_wrap=True)
    spec = Path(args.file)
    weights = Path(args.weights)

    def error(message: str) -> int:
        console.print(f"[red]error[/red]: {escape(message)}")
        return 2

    try:
        tok_path = _check_folder(weights)
        device = _check_args(args)
        start = time.perf_counter()
        pkg, reused = cached_build(spec, args.build_dir)
        console.print(
            f"[dim]{'reused' if reused else 'built'} {pkg.__name__} in {time.perf_counter() - start:.2f} s[/dim]"
        )
    except GenerateError as e:
        return error(str(e))
    except DslcError:
        raise
    import torch
    from tokenizers import Tokenizer

    from dslc.runtime import QUANTIZED, load_config, model_class, parse_set, quantize, torch_dtype

    model_cls = model_class(pkg)

    dtype = torch_dtype(args.dtype, device)
    try:  # everything but the weights, before the weights load
        config = load_config(model_cls, pkg, weights, parse_set(getattr(args, "set", [])), spec.name)
    except GenerateError as e:
        return error(str(e))
    try:
        tokenizer = _native(lambda: Tokenizer.from_file(str(tok_path)), f"{tok_path} cannot be read as a tokenizer")
        vocab = getattr(config, "vocab_size", None)
        vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None
        ids = _native(lambda: tokenizer.encode(args.prompt).ids, f"{tok_path} cannot encode the prompt")
        if not ids:  # as transformers: generation with no prompt starts from the BOS token, when there is one
            bos = _special_ids(weights, "bos_token_id", vocab)
            if not bos:
                what = "is empty" if not args.prompt else f"({args.prompt!r}) encodes to no tokens"
                raise GenerateError(
                    f"--prompt {what} and {weights} names no bos_token_id to start from: give the text to continue"
                )
            ids = bos[:1]
            console.print(f"[dim]no prompt tokens: starting from bos_token_id {ids[0]}[/dim]")
        outside = [i for i in ids if vocab is not None and i >= vocab]
        if outside:
            raise GenerateError(
                f"{tok_path} gives the prompt token id {outside[0]}, outside the model's vocabulary "
                f"(vocab_size={vocab} in {weights / 'config.json'}): the tokenizer does not belong to this model"
            )
        context = _context(config)
        if context is not None and len(ids) + args.max_new_tokens > context[1]:
            raise GenerateError(
                f"--prompt ({len(ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) = "
                f"{len(ids) + args.max_new_tokens} tokens is past the model's context ({context[0]}={context[1]} "
                f"in {weights / 'config.json'}): shorten the prompt or lower --max-new-tokens"
            )
        eos = _eos_ids(weights, tokenizer, vocab)
    except GenerateError as e:
        return error(str(e))
    start = time.perf_counter()
    try:
        model = model_cls.from_pretrained(weights, dtype=dtype, device=device, config=config)
        if args.dtype in QUANTIZED:
            quantize(model, args.dtype)
    except (pkg.ConfigError, pkg.CheckpointError) as e:
        return error(f"{weights} does not fit {spec.name}: {e}")
    except GenerateError as e:
        return error(str(e))
    load_s = time.perf_counter() - start
    input_ids = torch.tensor([ids], device=device)
    generator = torch.Generator(device=input_ids.device).manual_seed(args.seed)
    out_ids: list[int] = []
    printed = ""

    def stream(token: torch.Tensor) -> None:
        nonlocal printed
        out_ids.append(int(token[0]))
        text = _native(lambda: tokenizer.decode(out_ids), f"{tok_path} cannot decode the generated tokens")
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text

    sys.stdout.write(args.prompt)
    start = time.perf_counter()
    try:
        model.generate(
            input_ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=eos,
            generator=generator,
            streamer=stream,
        )
    except (GenerateError, ValueError) as e:
        sys.stdout.write("\n")
        return error(str(e))
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    n = len(out_ids)
    console.print(
        f"[dim]{n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tokens/s); "
        f"loaded {model.num_parameters():,} parameters in {load_s:.2f} s[/dim]"
    )
    return 0
