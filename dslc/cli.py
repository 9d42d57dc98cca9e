"""`dslc` command line: check, show, build, generate, chat, serve, train, convert.

The compiler commands never import torch, so they start fast; `generate`, `chat`, `serve`, `train` and
`convert` import the built package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dslc.diagnostics import Diagnostic, DslcError, render_all, to_json


def _overrides(pairs: list[str], spec: str = "<command line>") -> dict[str, str]:
    """`--set key=value` pairs; a malformed one is E024, located at the spec it was meant for."""
    from dslc.diagnostics import Diagnostic, Span

    out = {}
    for p in pairs or ():
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise DslcError(
                [
                    Diagnostic(
                        "E024",
                        f"`--set {p}` is not `key=value`",
                        Span.at(spec, 1, 1),
                        ("write it as `--set num_hidden_layers=2`",),
                    )
                ]
            )
        if not _finite(value.strip()):  # docs/language.md: non-finite values are errors
            raise DslcError(
                [
                    Diagnostic(
                        "E021",
                        f"`--set {p.strip()}`: {value.strip()!r} is not a finite number",
                        Span.at(spec, 1, 1),
                        ("give a finite number, e.g. `--set rms_norm_eps=1e-6`",),
                    )
                ]
            )
        out[key.strip()] = value.strip()
    return out


def _finite(text: str) -> bool:
    """False for a `--set` value read as a float that is NaN or infinite (`nan`, `inf`, `1e400`)."""
    import math

    try:
        int(text.replace("_", ""))
        return True
    except ValueError:
        pass
    try:
        return math.isfinite(float(text.replace("_", "")))
    except ValueError:
        return True  # a string or a bool: the checker types it


def _sources(diags: list[Diagnostic]) -> dict[str, list[str]]:
    out = {}
    for d in diags:
        f = d.span.file
        if f not in out:
            try:
                out[f] = Path(f).read_bytes().decode("utf-8", errors="replace").split("\n")
            except OSError:
                out[f] = []
    return out


def _report(diags: list[Diagnostic], as_json: bool) -> None:
    if as_json:
        print(to_json(diags))
    elif diags:
        print(render_all(diags, _sources(diags)), file=sys.stderr)


def _check(args) -> int:
    from dslc.api import check_file

    try:
        checked = check_file(args.file, args.arch, _overrides(args.set, args.file), variants=args.configs)
    except DslcError as e:
        _report(e.diagnostics, args.json)
        if not args.json:
            n = len(e.diagnostics)
            print(f"\nerror: {args.file}: {n} error{'s' * (n != 1)}", file=sys.stderr)
        return 1
    _report(checked.warnings, args.json)
    if not args.json:
        p = checked.program
        arch = f" (arch {p.arch})" if p.arch else ""
        print(
            f"ok: {args.file}: {p.model}{arch}, {p.param_count:,} parameters, "
            f"{len(checked.warnings)} warning{'s' * (len(checked.warnings) != 1)}"
            + (f"; {checked.variants_checked} other configs checked" if checked.variants_checked else "")
        )
    return 0


def _show(args) -> int:
    from dslc.api import check_file
    from dslc.show import show_program

    try:
        checked = check_file(args.file, args.arch, _overrides(args.set, args.file))
    except DslcError as e:
        _report(e.diagnostics, False)
        return 1
    if args.archs:
        from dslc.show import show_archs

        try:
            return show_archs(args.file, checked)
        except DslcError as e:
            _report(e.diagnostics, False)
            return 1
    return show_program(checked, ir=args.ir, graph=args.graph, fusion=args.fusion)


def _build(args) -> int:
    from dslc.build import build_command

    return build_command(args)


def _generate(args) -> int:
    from dslc.generate import generate_command

    return generate_command(args)


def _train(args) -> int:
    from dslc.train import train_command

    return train_command(args)


def _chat(args) -> int:
    from dslc.chat import chat_command

    return chat_command(args)


def _convert(args) -> int:
    from dslc.convert import convert_command

    return convert_command(args)


def _serve(args) -> int:
    from dslc.serve.command import serve_command

    return serve_command(args)


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    """The spec, the checkpoint folder and how to load it: generate, chat and serve."""
    p.add_argument("file", help="the .model spec")
    p.add_argument("--weights", required=True, help="Hugging Face checkpoint folder")
    p.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 | int8 | int4 (int8 / int4: torchao weight-only)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config.json field")
    p.add_argument("--build-dir", default=None, help="where to cache the build (default: ~/.cache/dslc)")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (a whole number >= 0)")
    return n


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the .model spec")
    p.add_argument("--arch", help="a named arch declared in the spec")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dslc", description="Compile .model specs into PyTorch packages.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="parse and check a spec; exit 0 when clean")
    _add_spec_args(p)
    p.add_argument("--json", action="store_true", help="diagnostics as JSON on stdout")
    p.add_argument(
        "--configs",
        type=_count,
        default=64,
        metavar="N",
        help="also check up to N other configs the spec's requires allow, to find one it fails for (default 64; "
        "0: only the config given)",
    )
    p.set_defaults(run=_check)

    p = sub.add_parser("show", help="print the config, the weight tree and the IR")
    _add_spec_args(p)
    p.add_argument("--ir", action="store_true", help="print the full IR")
    p.add_argument("--fusion", action="store_true", help="print the fusion report")
    p.add_argument("--archs", action="store_true", help="list the named archs, what each sets, their parameter counts")
    p.add_argument("--graph", metavar="OUT", help="write the IR graph as .dot or .svg")
    p.set_defaults(run=_show)

    p = sub.add_parser("build", help="generate a Python package (standalone, or on transformers with --target hf)")
    _add_spec_args(p)
    p.add_argument("-o", "--out", default="build", help="output folder (the package goes in OUT/<name>)")
    p.add_argument(
        "--target",
        choices=("standalone", "hf"),
        default="standalone",
        help="standalone: imports torch and safetensors only; hf: transformers' PreTrainedModel, GenerationMixin "
        "and caches, registered with the Auto classes",
    )
    p.add_argument("--name", help="package name (default: the spec's file stem)")
    p.add_argument("--report", action="store_true", help="print the fusion report")
    p.set_defaults(run=_build)

    p = sub.add_parser("generate", help="build, load a checkpoint folder and generate text")
    _add_inference_args(p)
    p.add_argument("--prompt", default="", help="text to continue")
    _add_sampling_args(p, max_new_tokens=64)
    p.set_defaults(run=_generate)

    p = sub.add_parser("chat", help="multi-turn chat in the terminal with the folder's chat template")
    _add_inference_args(p)
    p.add_argument("--system", default=None, help="the system message")
    _add_sampling_args(p, max_new_tokens=256)
    p.set_defaults(run=_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible server (continuous batching) and a chat page")
    _add_inference_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together (rows of the KV cache)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before a 429")
    p.add_argument(
        "--max-len",
        type=int,
        default=4096,
        help="longest sequence per slot, prompt + completion (at most the model's context); the KV cache holds "
        "slots x max-len positions",
    )
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (else 413)")
    p.set_defaults(run=_serve)

    p = sub.add_parser(
        "convert",
        help="rewrite a checkpoint folder from one of the spec's declared layouts (checkpoint \"meta\":) to HF's",
    )
    p.add_argument("file", help="the .model spec")
    p.add_argument("--layout", required=True, help='the spec\'s `checkpoint "NAME":` section the folder is in')
    p.add_argument("src", metavar="IN", help="the folder to convert (safetensors; config.json, or --arch)")
    p.add_argument("dst", metavar="OUT", help="a new folder for the Hugging Face checkpoint")
    p.add_argument("--arch", help="the spec's named arch, for a folder without config.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--build-dir", default=None, help="where to cache the build (default: ~/.cache/dslc)")
    p.set_defaults(run=_convert)

    p = sub.add_parser(
        "train",
        help="fine-tune a checkpoint folder with the package built from the spec (causal LM, classification, "
        "masked LM); torchrun-aware",
        description="Settings: defaults < --config FILE (TOML) < the flags below < --set section.key=value "
        "(README, Training: every key).",
    )
    p.add_argument("file", help="the .model spec")
    p.add_argument("--weights", required=True, help="Hugging Face checkpoint folder (config.json, tokenizer.json)")
    p.add_argument("--data", required=True, help=".jsonl (a text field; text + label to classify) or .txt")
    p.add_argument("--config", help="a TOML file of settings ([data], [train], [optim], [lora], [parallel], [model])")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    p.add_argument("--out", help="= train.output: metrics, checkpoints and the exported model")
    p.add_argument("--bf16", action="store_true", help="= train.bf16=true: bfloat16 autocast")
    p.add_argument("--lora", metavar="r=8,alpha=16,targets=q_proj,v_proj", help="LoRA through PEFT (lora.*)")
    p.add_argument("--tp", type=int, help="= parallel.tp: tensor-parallel degree (model.parallelize)")
    p.add_argument("--fsdp", action="store_true", help="= parallel.fsdp=true: shard over the ranks (model.parallelize)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue from a checkpoint folder (default: the latest in train.output/checkpoints)",
    )
    p.add_argument("--build-dir", default=None, help="where to cache the build (default: ~/.cache/dslc)")
    p.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.run(args)
    except DslcError as e:
        _report(e.diagnostics, getattr(args, "json", False))
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
