"""Put a generated package in place: never touch a folder dslc did not write, never leave a moment without a
package, one build at a time per output folder.

- The package is written into a staging folder beside its destination, then swapped in with one atomic
  exchange (`renameat2(RENAME_EXCHANGE)` on Linux, `renamex_np(RENAME_SWAP)` on macOS); where neither
  exists, two renames with the previous package restored if the second fails.
- Only a folder that holds a dslc package (its `build.json`, and no file the build did not write) is ever
  replaced; anything else at the destination is refused with an `InstallError`.
- A lock on the output folder serializes concurrent builds; staging folders left by a killed build are
  removed by the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "build.json"
SWAP_DELAY = "DSLC_BUILD_SWAP_DELAY"  # seconds to wait before the swap: lets tests kill a build in that window


class InstallError(Exception):
    """The package cannot be put in place; the message names the path and what to do."""


def install(out_dir: Path, pkg: str, files: dict[str, str]) -> Path:
    """Write `files` as the package `out_dir/pkg` and return its path."""
    out_dir = _output_folder(Path(out_dir))
    target = out_dir / pkg
    with _locked(out_dir):
        _remove_stale(out_dir, pkg)
        _check_replaceable(target, set(files))
        staging = _stage(out_dir, pkg, files)
        try:
            if os.environ.get(SWAP_DELAY):
                time.sleep(float(os.environ[SWAP_DELAY]))
            if target.exists():
                _swap(staging, target)  # after an exchange, staging holds the previous package
                shutil.rmtree(staging, ignore_errors=True)
            else:
                os.rename(staging, target)
        except BaseException:
            if staging.exists():  # not swapped in (or, swapped, it holds the previous package)
                shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


# ---- the output folder and the destination ---------------------------------------------------------------
def _output_folder(out_dir: Path) -> Path:
    if out_dir.is_symlink() and not out_dir.exists():
        raise InstallError(
            f"output folder {out_dir} is a symbolic link to nothing ({os.readlink(out_dir)}): point -o at a folder"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise InstallError(f"output folder {out_dir} is a file, not a folder: point -o at a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InstallError(f"cannot create the output folder {out_dir}: {e.strerror or e}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InstallError(f"output folder {out_dir} is not writable: choose another -o")
    return out_dir


def written_files(folder: Path) -> set[str] | None:
    """The files a dslc build wrote into `folder` (from its build.json), or None when it is not a dslc package."""
    manifest = folder / MANIFEST
    if folder.is_symlink() or not folder.is_dir() or not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "dslc_version" not in data:
        return None
    listed = data.get("files")
    return set(listed) if isinstance(listed, list) else set()


def _check_replaceable(target: Path, new_files: set[str]) -> None:
    if not target.exists() and not target.is_symlink():
        return
    written = written_files(target)
    if written is None:
        raise InstallError(
            f"{target} exists and is not a package dslc built (it has no {MANIFEST} from dslc): refusing to "
            "replace it. Choose another -o or --name, or move it away yourself."
        )
    others = sorted(
        str(p.relative_to(target))
        for p in target.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and str(p.relative_to(target)) not in written | new_files
    )
    if written and others:  # an older build.json lists no files: its folder is taken as all dslc's
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise InstallError(
            f"{target} holds files dslc did not write ({shown}): refusing to replace it. Move them "
            "out of the package folder, or build into another -o or --name."
        )


# ---- staging ----------------------------------------------------------------------------------------------
def _stage(out_dir: Path, pkg: str, files: dict[str, str]) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{pkg}.new-", dir=out_dir))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the package gets the usual folder mode
        for rel, text in sorted(files.items()):
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise InstallError(
            f"cannot write the package into {out_dir}: {why}; the previous package is untouched"
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _remove_stale(out_dir: Path, pkg: str) -> None:
    """Staging folders of this package left by a build that was killed (none can be live: we hold the lock)."""
    for p in out_dir.glob(f".{pkg}.new-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
    for p in out_dir.glob(f".{pkg}.old-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


# ---- the swap -------------------------------------------------------------------------------------------------
def _swap(staging: Path, target: Path) -> None:
    """Exchange the two folders atomically where the OS can; else two renames, restoring on failure."""
    if exchange(staging, target):
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        _restore(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _restore(old: Path, target: Path) -> None:
    """Put the previous package back after a failed second rename (copying if renames fail now)."""
    try:
        os.rename(old, target)
    except OSError:
        shutil.copytree(old, target)
        shutil.rmtree(old, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step; False where the platform or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        result = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rename_swap = 2
        result = libc.renamex_np(os.fsencode(a), os.fsencode(b), rename_swap)
    else:
        return False
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder (flock on the folder itself: no lock file to leave behind)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; builds there are not serialized
        yield
        return
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
