"""`dslc build` never loses a user's files and never leaves a moment without a package: it replaces only a
folder dslc wrote, swaps atomically (a kill -9 in the swap window leaves the previous package), serializes
concurrent builds, and answers bad output folders with a message instead of a traceback."""

from __future__ import annotations

import errno
import os
import pathlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dslc.build import build
from dslc.install import SWAP_DELAY, InstallError

SPEC = Path(__file__).resolve().parent / "specs" / "norms.model"


def _cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dslc.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _stray(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("layout", ["user-folder", "specs-folder"])
def test_a_folder_dslc_did_not_write_is_never_replaced(tmp_path, layout):
    if layout == "user-folder":  # dslc build -o OUT --name notes, where OUT/notes is the user's
        out, name = tmp_path / "out", "notes"
    else:  # dslc build -o m --name models: the user's specs and checkpoint folder
        out, name = tmp_path / "m", "models"
    victim = out / name
    (victim / "sub").mkdir(parents=True)
    (victim / "todo.txt").write_text("mine")
    (victim / "sub" / "weights.safetensors").write_bytes(b"\0" * 64)
    before = _snapshot(victim)
    r = _cli("build", str(SPEC), "-o", str(out), "--name", name)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "is not a package dslc built" in r.stderr and "refusing to replace it" in r.stderr
    assert _snapshot(victim) == before and _stray(out) == []


def test_a_user_file_inside_the_package_is_never_deleted(tmp_path):
    out = tmp_path / "out"
    target = build(SPEC, out)
    (target / "my_notes.md").write_text("do not lose me")
    with pytest.raises(InstallError, match="holds files dslc did not write .my_notes.md."):
        build(SPEC, out)
    assert (target / "my_notes.md").read_text() == "do not lose me"
    assert (target / "modeling.py").is_file() and _stray(out) == []


def test_bad_output_folders_are_clear_errors(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    markup = tmp_path / "odd [/x] [bold]name"
    cases = [
        (a_file, "is a file, not a folder"),
        (dangling, "symbolic link to nothing"),
        (a_file / "sub", "cannot create"),
    ]
    for out, message in cases:
        r = _cli("build", str(SPEC), "-o", str(out))
        assert r.returncode == 1 and "Traceback" not in r.stderr and message in r.stderr, (out, r.stderr)
    r = _cli("build", str(SPEC), "-o", str(markup))  # rich markup in a path is printed as text
    assert r.returncode == 0, r.stderr
    assert "[/x]" in r.stderr and (markup / "norms" / "modeling.py").is_file()


def test_a_full_disk_is_a_message_and_leaves_the_previous_package(tmp_path, monkeypatch):
    out = tmp_path / "out"
    target = build(SPEC, out)
    before = _snapshot(target)
    real = pathlib.Path.write_text

    def full(path, *args, **kwargs):
        if path.parent.name.startswith(".norms.new-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(InstallError, match="the disk is full; the previous package is untouched"):
        build(SPEC, out)
    monkeypatch.undo()
    assert _snapshot(target) == before and _stray(out) == []


def _wait_for(predicate, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def test_kill_9_in_the_swap_window_leaves_the_previous_package(tmp_path):
    out = tmp_path / "out"
    target = build(SPEC, out)
    before = _snapshot(target)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dslc.cli", "build", str(SPEC), "-o", str(out)],
        env={**os.environ, SWAP_DELAY: "60"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    names = set(before)
    try:  # the staging folder holds every file: the build now waits to swap, and is killed there
        _wait_for(lambda: any(set(_snapshot(p)) == names for p in out.glob(".norms.new-*")))
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _snapshot(target) == before, "the package changed or vanished"
    assert _stray(out), "the killed build's staging folder is expected to be left behind"
    build(SPEC, out)  # the next build removes it
    assert _stray(out) == [] and _snapshot(target) == before


def test_concurrent_builds_and_a_reader_never_see_a_missing_package(tmp_path):
    out = tmp_path / "out"
    target = build(SPEC, out)
    script = f"from dslc.build import build\nfor _ in range(4):\n    build({str(SPEC)!r}, {str(out)!r})\n"
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    missing = polls = 0
    while any(p.poll() is None for p in procs):
        polls += 1
        if not ((target / "build.json").is_file() and (target / "modeling.py").is_file()):
            missing += 1
    errors = [p.stderr.read() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert polls > 0 and missing == 0, f"the package was missing in {missing} of {polls} polls"
    assert _stray(out) == [] and (target / "modeling.py").is_file()
