"""Loading a spec and a checkpoint folder for inference (`dslc generate`, `dslc chat`, `dslc serve`):
the cached build, config.json with `--set` overrides, the tokenizer, EOS ids, the context length, and
`--dtype` (a float dtype, or torchao's weight-only int8 / int4 on the Linear layers)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dslc.generate import (
    GenerateError,
    _check_folder,
    _context,
    _device,
    _eos_ids,
    _native,
    _read_json,
    _special_ids,
    cached_build,
)

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
QUANTIZED = ("int8", "int4")  # torchao weight-only quantization of every nn.Linear
DTYPES = FLOAT_DTYPES + QUANTIZED


def parse_set(pairs: list[str]) -> dict:
    """`--set key=value` pairs as config values: JSON (`2`, `1e-6`, `true`, `[1, 2]`), else the text itself."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise GenerateError(f"--set {pair!r} is not `key=value`: write it as `--set max_position_embeddings=256`")
        try:
            out[key.strip()] = json.loads(value.strip())
        except ValueError:
            out[key.strip()] = value.strip()
    return out


def model_class(pkg):
    """The package's model class that loads a folder and generates (the spec's `model`)."""
    return next(
        getattr(pkg, n)
        for n in pkg.__all__
        if hasattr(getattr(pkg, n), "from_pretrained") and hasattr(getattr(pkg, n), "generate")
    )


def load_config(model_cls, pkg, weights: Path, overrides: dict, spec_name: str):
    """config.json with `--set` overrides, as the package's config class; an unknown key names the fields."""
    values = _read_json(weights / "config.json")
    fields = getattr(model_cls.config_class, "TYPES", None)
    for key in overrides:
        if fields is not None and key not in fields:
            raise GenerateError(f"--set {key}: {spec_name}'s config has no field {key!r} (fields: {', '.join(fields)})")
    values.update(overrides)
    try:
        return model_cls.config_class.from_dict(values)
    except pkg.ConfigError as e:
        where = " (with --set overrides)" if overrides else ""
        raise GenerateError(f"{weights / 'config.json'}{where} does not fit {spec_name}: {e}") from None


def quantize(model, kind: str) -> None:
    """Weight-only int8 / int4 through torchao's `quantize_` on every nn.Linear; a GenerateError says why not."""
    try:
        import logging

        logging.getLogger("torchao").setLevel(logging.ERROR)  # optional CUDA extensions it cannot load on CPU
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise GenerateError(
            f"--dtype {kind} quantizes with torchao, which is not installed ({e}): pip install torchao"
        ) from None
    config = Int8WeightOnlyConfig() if kind == "int8" else Int4WeightOnlyConfig(group_size=32)
    hint = "int4 weight-only needs torchao's int4 kernels (CUDA, or the mslk package): use --dtype int8"
    try:
        quantize_(model, config)
    except (ImportError, RuntimeError, NotImplementedError, ValueError, AssertionError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise GenerateError(
            f"--dtype {kind}: torchao cannot quantize this model on {model.device} ({type(e).__name__}: {first})"
            + (f"; {hint}" if kind == "int4" else "")
        ) from None


def torch_dtype(name: str | None, device):
    """The floating dtype the weights load in: --dtype's, float32 for int8 / int4 on CPU, bfloat16 on CUDA."""
    import torch

    if name in QUANTIZED:
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name or "float32"]


@dataclass
class Runtime:
    """A loaded model with what serving it needs: tokenizer, EOS ids, context length, folder."""

    pkg: object
    model: object
    tokenizer: object
    weights: Path
    name: str
    eos: list[int]
    bos: list[int]
    context: tuple[str, int] | None
    vocab: int | None
    cap: int | None = None  # a server's --max-len, below the model's context

    @property
    def max_len(self) -> int:
        """The longest sequence (prompt + generated) a request may have: the config's context (else 4096),
        at most `cap`."""
        longest = self.context[1] if self.context else 4096
        return min(longest, self.cap) if self.cap else longest

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`; `special=False` for rendered chat templates (which hold their own, as HF)."""
        return _native(lambda: self.tokenizer.encode(text, add_special_tokens=special).ids, "the tokenizer")

    def decode(self, ids: list[int]) -> str:
        return _native(lambda: self.tokenizer.decode(ids, skip_special_tokens=True), "the tokenizer")

    def context_error(self, prompt: int, new: int, what: str = "the prompt", limit: str = "max_tokens") -> str | None:
        """Why `prompt` + `new` tokens do not fit the model's context, or None when they do."""
        if prompt + new <= self.max_len:
            return None
        where = f"{self.context[0]}={self.context[1]} in {self.weights / 'config.json'}" if self.context else "4096"
        bound = f"the model's context ({where})"
        if self.max_len < (self.context[1] if self.context else 4096):
            bound = f"the server's --max-len {self.max_len} (the model's context: {where})"
        return f"{what} ({prompt} tokens) + {limit} ({new}) = {prompt + new} tokens is past {bound}: shorten the prompt or lower {limit}"


def load_runtime(
    spec: Path,
    weights: Path,
    *,
    dtype: str | None = None,
    device: str | None = None,
    build_dir: str | None = None,
    overrides: dict | None = None,
    log=None,
) -> Runtime:
    """Build (or reuse) the package of `spec`, load `weights` with `overrides`, quantize for int8 / int4."""
    import time

    if dtype is not None and dtype not in DTYPES:
        raise GenerateError(f"unknown --dtype {dtype!r}; use {', '.join(DTYPES)}")
    tok_path = _check_folder(weights)
    dev = _device(device)
    start = time.perf_counter()
    pkg, reused = cached_build(spec, build_dir)
    if log:
        log(f"{'reused' if reused else 'built'} {pkg.__name__} in {time.perf_counter() - start:.2f} s")
    from tokenizers import Tokenizer

    model_cls = model_class(pkg)
    config = load_config(model_cls, pkg, weights, overrides or {}, spec.name)
    tokenizer = _native(lambda: Tokenizer.from_file(str(tok_path)), f"{tok_path} cannot be read as a tokenizer")
    vocab = getattr(config, "vocab_size", None)
    vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None
    eos = _eos_ids(weights, tokenizer, vocab)
    bos = _special_ids(weights, "bos_token_id", vocab)
    start = time.perf_counter()
    try:
        model = model_cls.from_pretrained(weights, dtype=torch_dtype(dtype, dev), device=dev, config=config)
    except (pkg.ConfigError, pkg.CheckpointError) as e:
        raise GenerateError(f"{weights} does not fit {spec.name}: {e}") from None
    if dtype in QUANTIZED:
        quantize(model, dtype)
    model.eval()
    if log:
        log(f"loaded {model.num_parameters():,} parameters in {time.perf_counter() - start:.2f} s")
    return Runtime(pkg, model, tokenizer, weights, weights.resolve().name, eos, bos, _context(config), vocab)


def runtime_from_args(args, log=None) -> Runtime:
    """`load_runtime` from the inference commands' shared flags (spec, --weights, --dtype, --device,
    --build-dir, --set), as `dslc chat` and `dslc serve` parse them."""
    return load_runtime(
        Path(args.file),
        Path(args.weights),
        dtype=args.dtype,
        device=args.device,
        build_dir=args.build_dir,
        overrides=parse_set(args.set),
        log=log,
    )
