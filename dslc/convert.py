"""`dslc convert SPEC --layout NAME IN OUT`: a checkpoint folder in one of the spec's declared foreign layouts
(`checkpoint "meta":` rules: other names, permuted or fused tensors) rewritten as a Hugging Face folder,
config.json, safetensors under the model's own names and the tokenizer files, which transformers and every
dslc command then load as they are (fairseq2's loader job, done by the spec's rules)."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from dslc.generate import GenerateError, cached_build
from dslc.runtime import parse_set

# files of a checkpoint folder that are not weights, copied to the converted folder as they are
COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


class ConvertError(GenerateError):
    """A convert request that cannot be carried out, said in one line (the CLI prints it, exit 2)."""


def _model_class(pkg):
    """The spec's model class (the one with a config_class and from_pretrained)."""
    return next(
        getattr(pkg, n)
        for n in pkg.__all__
        if hasattr(getattr(pkg, n), "config_class") and hasattr(getattr(pkg, n), "from_pretrained")
    )


def layouts_of(model_cls) -> list[str]:
    """The named checkpoint layouts the spec declares (`checkpoint "meta":`), in order."""
    return list(dict.fromkeys(r["layout"] for r in model_cls.layout_rules if r.get("layout")))


def _config(model_cls, src: Path, arch: str | None, overrides: dict):
    """config.json of `src` when it has one, else the spec's arch; `--set` values over either."""
    config_cls = model_cls.config_class
    if (src / "config.json").is_file():
        if arch is not None:
            raise ConvertError(f"{src} has a config.json: --arch is for a folder without one")
        values = dict(config_cls.from_pretrained(src).to_dict())
        values.pop("extra", None)
        unknown = [k for k in overrides if k not in config_cls.TYPES]
        if unknown:
            raise ConvertError(f"--set {unknown[0]}: the spec's config has no such field")
        return config_cls.from_dict({**values, **overrides})
    if arch is None:
        archs = ", ".join(config_cls.ARCHS) or "none declared"
        raise ConvertError(f"{src} has no config.json: name the model's sizes with --arch (archs: {archs}) or add one")
    return config_cls.for_arch(arch, **overrides)


def convert(spec: Path, layout: str, src: Path, dst: Path, *, arch=None, overrides=None, build_dir=None) -> dict:
    """Rewrite `src` (layout `layout` of `spec`) as a Hugging Face folder `dst`; returns what was done
    (`tensors` read, `files` copied, `parameters`). Refuses, before writing anything: an unknown layout (naming
    the declared ones), a folder with no tensor of that layout, a `dst` that exists and is not empty."""
    if not src.is_dir():
        raise ConvertError(f"checkpoint folder not found: {src}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConvertError(f"{dst} exists and is not empty: give a new folder (nothing was written)")
    if dst.resolve() == src.resolve():
        raise ConvertError("IN and OUT are the same folder: give a new folder for the converted checkpoint")
    pkg, _ = cached_build(spec, build_dir)
    model_cls = _model_class(pkg)
    declared = layouts_of(model_cls)
    if layout not in declared:
        known = ", ".join(f'"{n}"' for n in declared) or 'none (add a `checkpoint "name":` section)'
        raise ConvertError(f"{spec} declares no checkpoint layout {layout!r}; its layouts: {known}")
    checkpoint = importlib.import_module(f"{pkg.__name__}.checkpoint")
    keys = list(checkpoint.CheckpointReader(src).keys())
    sources = [s for r in model_cls.layout_rules if r.get("layout") == layout for s in r["sources"]]
    if not any(checkpoint.key_matches(s, k) for s in sources for k in keys):
        raise ConvertError(
            f"{src} holds no tensor of layout {layout!r} (such as `{sources[0]}`); its tensors are named like "
            f"`{keys[0] if keys else 'nothing'}`"
        )
    config = _config(model_cls, src, arch, overrides or {})
    model = model_cls.from_pretrained(src, config=config)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    copied = []
    for name in COPIED:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    parameters = sum(p.numel() for p in model.parameters())
    return {"tensors": len(keys), "files": copied, "parameters": parameters}


def convert_command(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, soft_wrap=True)
    try:
        done = convert(
            Path(args.file),
            args.layout,
            Path(args.src),
            Path(args.dst),
            arch=args.arch,
            overrides=parse_set(args.set),
            build_dir=args.build_dir,
        )
    except GenerateError as e:
        console.print(f"[red]error[/red]: {escape(str(e))}")
        return 2
    except Exception as e:  # a checkpoint or config the package refuses: its message names the tensor or key
        if type(e).__name__ not in ("CheckpointError", "ConfigError"):
            raise
        console.print(f"[red]error[/red]: {escape(str(e))}")
        return 2
    files = f" + {', '.join(done['files'])}" if done["files"] else ""
    console.print(
        f"converted {args.src} (layout {args.layout}, {done['tensors']} tensors) -> {args.dst}: Hugging Face "
        f"layout, {done['parameters']:,} parameters{files}"
    )
    return 0
