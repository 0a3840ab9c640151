"""The warm process of a checkout, for the stage commands a plain `dvc repro` (or `dvc exp
run`) starts itself (flows.warm forks them).

The first stage command starts it detached and later ones, of this and later repros, reuse
it, as long as nothing that decides what a stage process would import changed. It is
found by a key over:
- the checkout (DVC_ROOT) and the command's folder, so it never serves another checkout;
- the code: the bytes of every .py file of the `genpipe` and `flows` packages as imported;
- the environment: the interpreter, the installed packages (the mtime of every
  site-packages folder on sys.path, which an install or uninstall changes) and every
  environment variable except DVC's per-stage ones.
A command whose key differs starts another; a warm process whose code or packages changed
under it (a file's stat) exits as soon as no stage runs, so a stale one is never used. It
also exits after `GENPIPE_WARM_IDLE_S` seconds (default 60) without a stage.

Its socket, lock, state and log are `/tmp/genpipe-warm-<uid>/<key>.*` (a short path: a
unix socket's is limited to ~107 bytes), in a folder only this user may use.

    python -m flows.warm_shared SOCKET KEY IDLE_S     # started by `run`, never by hand
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import flows
import genpipe
from flows import warm

IDLE_ENV = "GENPIPE_WARM_IDLE_S"
IDLE_S = 60.0  # the gap between two stages of a repro is seconds; between repros, minutes
READY_S = 300.0  # a start that takes longer (a loaded machine) runs the stage by itself
MAX_SOCKET = 100  # bytes of a unix socket path, below the kernel's 107


def _volatile(name: str) -> bool:
    """Environment variables that differ between the stages of one repro (DVC's), or that
    a shell sets; the stage's own environment still reaches the child whole."""
    return name.startswith("DVC_") or name in {"PWD", "OLDPWD", "SHLVL", "_"}


def code_files() -> list[Path]:
    """The .py files of the packages a stage process imports, from where they are imported."""
    roots = [Path(p) for pkg in (genpipe, flows) for p in pkg.__path__]
    return sorted(f for root in roots for f in root.rglob("*.py"))


def package_dirs() -> list[Path]:
    return sorted({Path(p) for p in sys.path if Path(p).name in ("site-packages", "dist-packages")})


def snapshot() -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime) of the code files and package folders: changes when they do."""
    found = {}
    for path in [*code_files(), *package_dirs()]:
        with contextlib.suppress(OSError):
            st = path.stat()
            found[str(path)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return found


def root() -> str:
    return os.path.realpath(os.environ.get("DVC_ROOT") or os.getcwd())


def key(env: dict[str, str]) -> str:
    """What a warm process must share with a stage command to serve it (module docstring)."""
    h = hashlib.sha256()
    parts = [root(), os.getcwd(), sys.executable, sys.version]
    parts += [f"{k}={v}" for k, v in sorted(env.items()) if not _volatile(k)]
    parts += [f"{p}:{p.stat().st_mtime_ns}" for p in package_dirs() if p.is_dir()]
    for part in parts:
        h.update(part.encode(errors="surrogateescape") + b"\0")
    for path in code_files():
        h.update(str(path).encode(errors="surrogateescape") + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:24]


def folder() -> Path | None:
    """This user's folder for warm processes; None where it is not safely ours."""
    base = Path("/tmp") if os.path.isdir("/tmp") else Path(os.environ.get("TMPDIR", "/tmp"))
    path = base / f"genpipe-warm-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
    except OSError:
        return None
    if not path.is_dir() or path.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _start(sock: Path, digest: str, log: Path) -> bool:
    """Start a warm process and wait until it listens; False if it exits or takes too long."""
    idle = os.environ.get(IDLE_ENV, str(IDLE_S))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.warm_shared", str(sock), digest, idle],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # outlives this command; a Ctrl-C to DVC does not reach it
        )
    deadline = time.monotonic() + READY_S
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            print(f"genpipe: no warm process ({log}); the stage runs by itself", file=sys.stderr)
            return False
        time.sleep(0.05)
    return True


def _with_pipeline(env: dict[str, str]) -> dict[str, str]:
    """The stage's pipeline run (tracking.parent), found here: in the child, whose parent is
    the warm process and not DVC, it could not be."""
    from genpipe.tracking import parent

    group = parent.current()
    if group is None or parent.PIPELINE_ENV in env:
        return env
    return {**env, parent.PIPELINE_ENV: parent.describe(group.key, group.name, group.tags)}


def run(argv: list[str], env: dict[str, str]) -> int | None:
    """The stage command `argv` in a child of this checkout's warm process, started if none
    serves; its exit code, or None when none can (the command then runs by itself)."""
    where = folder()
    if where is None:
        return None
    digest = key(env)
    sock, lock = where / f"{digest}.sock", where / f"{digest}.lock"
    if len(os.fsencode(sock)) > MAX_SOCKET:
        return None
    env = _with_pipeline(env)
    for _ in range(2):  # a second time if the one found was exiting just then
        if (code := warm.hand_off(str(sock), argv, env)) is not None:
            return code
        with _locked(lock):  # one starter; the others wait for it, then connect
            if (code := warm.hand_off(str(sock), argv, env)) is not None:
                return code
            if not _start(sock, digest, where / f"{digest}.log"):
                return None
    return None


def serve(sock: str, digest: str, idle_s: float) -> None:
    """The detached side of `run`: serve until idle for `idle_s`, or until the code or the
    packages change; exits at once if they changed before it looked."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds: its files are removed
    before = snapshot()
    if key(dict(os.environ)) != digest:
        return
    base = sock.removesuffix(".sock")
    state = Path(f"{base}.json")
    state.write_text(json.dumps({"pid": os.getpid(), "root": root(), "cwd": os.getcwd()}))
    failed = True
    try:
        warm.serve(sock, lambda idle: idle >= idle_s or snapshot() != before, with_prefect=True)
        failed = False
    except SystemExit:  # SIGTERM
        failed = False
        raise
    finally:
        # its files too (the log only if it did not fail), unless another warm process of
        # this key took them over: two start at once only if a command opened the lock just
        # as this one removed it; the later one serves, the other idles out
        with contextlib.suppress(OSError, ValueError):
            if json.loads(state.read_text())["pid"] == os.getpid():
                for suffix in (".json", ".lock") + (() if failed else (".log",)):
                    Path(base + suffix).unlink(missing_ok=True)


if __name__ == "__main__":
    warm.run_then_exit(lambda: serve(sys.argv[1], sys.argv[2], float(sys.argv[3])))
