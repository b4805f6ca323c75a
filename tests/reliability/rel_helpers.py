"""Helpers of the reliability suite: file snapshots, the SIGKILL harness, the tally.

Kill points are deterministic: the child process counts refbuild's atomic
writes (temp files named `.tmp-*`) and sends itself SIGKILL at the N-th one, in
one of three phases:

  created  the temp file was just created, still empty;
  written  the temp file is fully written and fsynced, not yet renamed into place;
  renamed  the rename just happened, nothing after it (next file, done-marker) has.

SIGKILL cannot be caught, so the child dies exactly as under `kill -9`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"
PHASES = ("created", "written", "renamed")

# -- the tally: what the suite tried, for RELIABILITY.md ------------------------

TALLY: dict[str, set] = defaultdict(set)


def record(kind: str, key: object) -> None:
    """Count `key` once under `kind` (a set: the same key twice counts once)."""
    TALLY[kind].add(key)


def tally_counts() -> dict[str, int]:
    return {k: len(v) for k, v in TALLY.items()}


# -- snapshots ------------------------------------------------------------------

def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every regular file under `roots` (by `<root name>/<relative path>`), except the lock file."""
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink() and p.name != ".lock":
                out[f"{root.name}/{p.relative_to(root).as_posix()}"] = p.read_bytes()
    return out


def restore(snap: dict[str, bytes], parent: Path) -> None:
    """Write the files of `snap` under `parent` (the inverse of `snapshot`)."""
    for rel, data in snap.items():
        p = parent / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def diff(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    """Human-readable differences between two snapshots (empty when identical)."""
    out = [f"only in first: {k}" for k in sorted(set(a) - set(b))]
    out += [f"only in second: {k}" for k in sorted(set(b) - set(a))]
    out += [f"bytes differ: {k}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    return out


def assert_same(got: dict[str, bytes], want: dict[str, bytes], what: str) -> None:
    d = diff(got, want)
    assert not d, f"{what}: {len(d)} differences, e.g. " + "; ".join(d[:8])


def temps(*roots: Path) -> list[Path]:
    return [p for r in roots if r.exists() for p in r.rglob(TMP_PREFIX + "*")]


def assert_no_temps(*roots: Path) -> None:
    left = temps(*roots)
    assert not left, f"temp files left behind: {left}"


# -- counting atomic writes in-process -------------------------------------------

@contextlib.contextmanager
def count_renames() -> Iterator[list[int]]:
    """Count the renames of refbuild temp files into place while the block runs (in-process)."""
    real = os.replace
    n = [0]

    def counting(a, b, *args, **kw):
        if os.path.basename(str(a)).startswith(TMP_PREFIX):
            n[0] += 1
        return real(a, b, *args, **kw)

    os.replace = counting
    try:
        yield n
    finally:
        os.replace = real


# -- the SIGKILL harness -----------------------------------------------------------

KILL_MAIN = r"""
import os, signal, sys, tempfile
AT, PHASE = int(os.environ["RB_KILL_AT"]), os.environ["RB_KILL_PHASE"]
n = {"created": 0, "written": 0, "renamed": 0}
def hit(phase):
    n[phase] += 1
    if phase == PHASE and n[phase] == AT:
        os.kill(os.getpid(), signal.SIGKILL)
_mkstemp, _fsync, _replace = tempfile.mkstemp, os.fsync, os.replace
def mkstemp(*a, **kw):
    fd, path = _mkstemp(*a, **kw)
    if os.path.basename(path).startswith(".tmp-"):
        hit("created")
    return fd, path
def replace(a, b, *args, **kw):
    ours = os.path.basename(str(a)).startswith(".tmp-")
    if ours:
        hit("written")
    r = _replace(a, b, *args, **kw)
    if ours:
        hit("renamed")
    return r
tempfile.mkstemp, os.replace = mkstemp, replace
sys.argv[0] = "refbuild"
from refbuild.cli import main
main()
"""


def run_killed(args: list, at: int, phase: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `refbuild ARGS` in a child that SIGKILLs itself at the `at`-th atomic write, in `phase`.

    Returns the finished process: returncode -9 when the kill happened, 0 when
    the run had fewer writes than `at` and ended by itself."""
    assert phase in PHASES
    env = dict(os.environ, RB_KILL_AT=str(at), RB_KILL_PHASE=phase, KMP_DUPLICATE_LIB_OK="TRUE")
    return subprocess.run([sys.executable, "-c", KILL_MAIN, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def refbuild_proc(args: list, cwd: Path, **kw) -> subprocess.Popen:
    """`python -m refbuild ARGS` as a real child process."""
    env = dict(os.environ, KMP_DUPLICATE_LIB_OK="TRUE", COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "refbuild", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


# -- accounting for inputs ------------------------------------------------------------

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def input_files(src: Path) -> list[str]:
    """Every file or symbolic link with an image extension under `src`, found
    independently of refbuild (os.walk; links to folders are not followed)."""
    out = []
    for dirpath, _, filenames in os.walk(src):
        for name in filenames:
            p = Path(dirpath) / name
            if p.suffix.lower() in IMAGE_EXTS and (p.is_symlink() or p.is_file()) and not p.is_dir():
                out.append(p.relative_to(src).as_posix())  # regular files and links (broken ones too), no FIFOs
    return sorted(out)


def accounted(lib: Path) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """(faces by src_path, reject row by src_path); asserts no path is both, or rejected twice."""
    faces: dict[str, list[dict]] = defaultdict(list)
    for r in pq.read_table(lib / "faces.parquet").to_pylist():
        faces[r["src_path"]].append(r)
    rej = pq.read_table(lib / "rejects.parquet").to_pylist()
    rejects = {r["src_path"]: r for r in rej}
    assert len(rejects) == len(rej), "an image rejected twice"
    both = set(faces) & set(rejects)
    assert not both, f"images both a face and a reject: {sorted(both)}"
    return dict(faces), rejects


def killed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == -signal.SIGKILL


def ensure_killed_or_done(proc: subprocess.CompletedProcess, what: str) -> bool:
    """True when SIGKILL landed; False when the run ended cleanly first. Fails on anything else."""
    if killed(proc):
        return True
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return False


# -- a real refbuild process paused while it holds the library lock ------------------

GATE_MAIN = r"""
import os, sys, time
from pathlib import Path
PAUSED, RELEASE = Path(os.environ["RB_PAUSED"]), Path(os.environ["RB_RELEASE"])
_replace, _first = os.replace, [True]
def replace(a, b, *args, **kw):
    if _first[0] and os.path.basename(str(a)).startswith(".tmp-"):
        _first[0] = False
        PAUSED.write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not RELEASE.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return _replace(a, b, *args, **kw)
os.replace = replace
sys.argv[0] = "refbuild"
from refbuild.cli import main
main()
"""


def start_paused(args: list, cwd: Path, gate: Path, timeout: float = 60) -> subprocess.Popen:
    """Start `refbuild ARGS` as a real process that pauses at its first atomic write
    (inside the stage, holding the lock) until `gate/release` exists."""
    gate.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RB_PAUSED=str(gate / "paused"), RB_RELEASE=str(gate / "release"),
               KMP_DUPLICATE_LIB_OK="TRUE", COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-c", GATE_MAIN, *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import time

    deadline = time.monotonic() + timeout
    while not (gate / "paused").exists():
        if proc.poll() is not None:
            raise AssertionError(f"refbuild {args[0]} ended (exit {proc.returncode}) before pausing:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"refbuild {args[0]} did not reach its first write in {timeout} s")
        time.sleep(0.02)
    return proc


# -- one uninterrupted reference run, stage by stage --------------------------------------

STAGES = ("detect", "embed", "split", "pair")


def stage_args(stage: str, base: Path) -> list:
    """The command line of each stage for the library BASE/vol/lib (manifests in BASE/vol/man)."""
    src, lib, man = base / "src", base / "vol" / "lib", base / "vol" / "man"
    return {
        "detect": ["detect", src, "--out", lib, "--aligned", "--identity-from-folder", "--crop-size", 32,
                   "--shard-size", 4, "-q"],
        "embed": ["embed", lib, "--backbone", "pixels", "--views", "hr,lr", "--shard-size", 8, "--device", "cpu", "-q"],
        "split": ["split", lib, "-q"],
        "pair": ["pair", lib, "-m", 2, "--manifest-dir", man, "--name", "lib", "--device", "cpu", "-q"],
    }[stage]


@dataclass
class Reference:
    """Snapshots of an uninterrupted run before and after each stage, in the path
    every faulted run reuses (so absolute paths in the outputs agree)."""

    base: Path
    before: dict[str, dict[str, bytes]] = field(default_factory=dict)
    after: dict[str, dict[str, bytes]] = field(default_factory=dict)
    writes: dict[str, int] = field(default_factory=dict)  # atomic writes of each stage

    @property
    def vol(self) -> Path:  # lib and man live here: a small file system can be mounted on it
        return self.base / "vol"

    @property
    def lib(self) -> Path:
        return self.vol / "lib"

    @property
    def man(self) -> Path:
        return self.vol / "man"

    def reset_to(self, snap: dict[str, bytes]) -> None:
        for d in (self.lib, self.man):
            shutil.rmtree(d, ignore_errors=True)
        restore(snap, self.vol)

    def now(self) -> dict[str, bytes]:
        return snapshot(self.lib, self.man)


def build_reference(base: Path) -> Reference:
    from rb_helpers import invoke, make_faces

    r = Reference(base)
    make_faces(base / "src")  # 41 images, 10 identities, one photo under two identities
    for stage in STAGES:
        r.before[stage] = r.now()
        with count_renames() as n:
            invoke(*stage_args(stage, base))
        r.writes[stage] = n[0]
        r.after[stage] = r.now()
    assert r.writes["detect"] > 40 and r.writes["split"] == 2
    return r


def one_line(res) -> str:
    """A CLI result that failed with exactly one `error:` line (exit 1, no traceback): that line, spaces collapsed."""
    assert res.exit_code == 1, f"exit {res.exit_code}:\n{res.output}\n{res.exception!r}"
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    return " ".join(res.output[res.output.index("error:"):].split())
