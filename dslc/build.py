"""`dslc build`: check a spec and write its generated package atomically and deterministically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from dslc import __version__
from dslc.diagnostics import Diagnostic, DslcError, Span


def package_name(spec: Path, name: str | None) -> str:
    pkg = name or spec.stem.replace("-", "_").replace(".", "_")
    if not pkg.isidentifier() or pkg.startswith("__"):
        raise DslcError([Diagnostic("E070", f"`{pkg}` is not a valid package name", Span.at(str(spec), 1, 1),
                                    ("pass --name with a Python identifier",))])
    return pkg


def render(spec: Path, arch: str | None, overrides: dict[str, str], name: str | None):
    """Check the spec and render every file of its package: (package name, {file: text}, checked)."""
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
    }
    files = format_python(PackageRenderer(checked, spec.name, pkg, optimized).render(text, metadata))
    checked.optimized = optimized
    return pkg, files, checked


def write_atomically(out_dir: Path, pkg: str, files: dict[str, str]) -> Path:
    """Write the package beside its destination, then swap it into place with renames.

    An error or interruption before the swap leaves the previous package untouched.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / pkg
    staging = Path(tempfile.mkdtemp(prefix=f".{pkg}.new-", dir=out_dir))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the package gets the usual folder mode
    old = None
    try:
        for rel, text in sorted(files.items()):
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{pkg}.old-", dir=out_dir))
            os.rmdir(old)
            os.rename(target, old)
        os.rename(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            _restore(old, target)  # the swap failed halfway: put the previous package back
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _restore(old: Path, target: Path) -> None:
    try:
        os.rename(old, target)
    except OSError:  # the file system refuses renames now: copy it back instead
        shutil.copytree(old, target)
        shutil.rmtree(old, ignore_errors=True)


def build(spec: str | Path, out: str | Path = "build", arch: str | None = None,
          overrides: dict[str, str] | None = None, name: str | None = None) -> Path:
    """Build `spec` into `out/<name>/` and return that path (raises DslcError on a bad spec)."""
    pkg, files, _ = render(Path(spec), arch, overrides or {}, name)
    return write_atomically(Path(out), pkg, files)


def build_command(args) -> int:
    from rich.console import Console

    from dslc.cli import _overrides, _report

    console = Console(stderr=True, soft_wrap=True)
    start = time.perf_counter()
    spec = Path(args.file)
    try:
        pkg, files, checked = render(spec, args.arch, _overrides(args.set, args.file), args.name)
    except DslcError as e:
        _report(e.diagnostics, False)
        console.print(f"[red]build failed[/red]: {spec}; the previous package, if any, is untouched")
        return 1
    _report(checked.warnings, False)
    target = write_atomically(Path(args.out), pkg, files)
    ms = (time.perf_counter() - start) * 1000
    p = checked.program
    console.print(
        f"[green]built[/green] {target}/ ({p.model}, {p.param_count:,} parameters, "
        f"{len(p.modules)} modules, {len(files)} files) in {ms:.0f} ms"
    )
    if getattr(args, "report", False):
        from dslc.report import print_fusion_report

        print_fusion_report(checked.optimized)
    return 0
