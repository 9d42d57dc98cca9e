"""`dslc build`: check a spec and write its generated package atomically and deterministically."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from dslc import __version__
from dslc.diagnostics import Diagnostic, DslcError, Span


def package_name(spec: Path, name: str | None) -> str:
    from dslc.ir.names import package_name_problem

    pkg = name or spec.stem.replace("-", "_").replace(".", "_")
    if not pkg.isidentifier() or pkg.startswith("__"):
        raise DslcError(
            [
                Diagnostic(
                    "E070",
                    f"`{pkg}` is not a valid package name",
                    Span.at(str(spec), 1, 1),
                    ("pass --name with a Python identifier",),
                )
            ]
        )
    problem = package_name_problem(pkg)
    if problem:  # a package that shadows a module it imports (or its users import) breaks on import
        raise DslcError(
            [
                Diagnostic(
                    "E070",
                    f"package name {problem}",
                    Span.at(str(spec), 1, 1),
                    (
                        "pass --name with another name"
                        if name
                        else "the name comes from the file name: pass --name with another one",
                    ),
                )
            ]
        )
    return pkg


TARGETS = ("standalone", "hf")  # imports only torch + safetensors / on transformers' base classes


def render(spec: Path, arch: str | None, overrides: dict[str, str], name: str | None, target: str = "standalone"):
    """Check the spec and render every file of its package: (package name, {file: text}, checked)."""
    if target not in TARGETS:
        raise ValueError(f"unknown build target {target!r}: use one of {', '.join(TARGETS)}")
    from dslc.api import check_file
    from dslc.codegen.package import PackageRenderer
    from dslc.codegen.style import format_python
    from dslc.passes.pipeline import optimize

    checked = check_file(spec, arch, overrides)
    optimized = optimize(checked.program)
    pkg = package_name(spec, name)
    text = spec.read_bytes().decode("utf-8")
    metadata = {
        "dslc_version": __version__,
        "spec": spec.name,
        "spec_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "arch": arch,
        "overrides": dict(sorted(overrides.items())),
        "model": checked.program.model,
        "parameters": checked.program.param_count,
        "target": target,
    }
    files = format_python(PackageRenderer(checked, spec.name, pkg, optimized).render(text, metadata, target))
    checked.optimized = optimized
    return pkg, files, checked


def write_atomically(out_dir: Path, pkg: str, files: dict[str, str]) -> Path:
    """Put the package in place (dslc/install.py): atomic, never replacing a folder dslc did not write."""
    from dslc.install import install

    return install(Path(out_dir), pkg, files)


def build(
    spec: str | Path,
    out: str | Path = "build",
    arch: str | None = None,
    overrides: dict[str, str] | None = None,
    name: str | None = None,
    target: str = "standalone",
) -> Path:
    """Build `spec` into `out/<name>/` and return that path (raises DslcError on a bad spec). `target`:
    "standalone" (imports torch and safetensors only) or "hf" (on transformers' PreTrainedModel)."""
    pkg, files, _ = render(Path(spec), arch, overrides or {}, name, target)
    return write_atomically(Path(out), pkg, files)


def build_command(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    from dslc.cli import _overrides, _report
    from dslc.codegen.style import StyleError
    from dslc.install import InstallError

    console = Console(stderr=True, soft_wrap=True)
    start = time.perf_counter()
    spec = Path(args.file)
    try:
        pkg, files, checked = render(
            spec, args.arch, _overrides(args.set, args.file), args.name, getattr(args, "target", "standalone")
        )
    except DslcError as e:
        _report(e.diagnostics, False)
        console.print(f"[red]build failed[/red]: {escape(str(spec))}; the previous package, if any, is untouched")
        return 1
    except StyleError as e:
        console.print(f"[red]build failed[/red]: {escape(str(e))}")
        return 1
    _report(checked.warnings, False)

    try:
        target = write_atomically(Path(args.out), pkg, files)
    except InstallError as e:
        console.print(f"[red]build failed[/red]: {escape(str(e))}")
        return 1
    ms = (time.perf_counter() - start) * 1000
    p = checked.program
    console.print(
        f"[green]built[/green] {escape(str(target))}/ ({p.model}, {p.param_count:,} parameters, "
        f"{len(p.modules)} modules, {len(files)} files) in {ms:.0f} ms"
    )
    if getattr(args, "report", False):
        from dslc.report import print_fusion_report

        print_fusion_report(checked.optimized)
    return 0
