"""Prefect servers for genpipe's runs, so no stage pays for a temporary server of its own.

Without `PREFECT_API_URL`, a Prefect flow starts a temporary server inside its process (~8-13 s
on 2 cores, once per stage of a plain `dvc repro`). Two ways round it:

- `local_server`: one server for the length of a run (`make repro`, `genpipe audit`), stopped
  when the run ends;
- `shared_server`: for stages started by DVC itself (`dvc repro`, `dvc exp run`). The first
  stage starts a detached server; later stages, of this and any concurrent repro, reuse it,
  each holding a shared lock on a lease file while it runs; the server stops itself
  `idle_s` after the last stage let go. Its runs land in the same database as any server of
  this PREFECT_HOME, so `prefect server start` shows them later.

A long-running `prefect server start` with `PREFECT_API_URL` exported removes the start-up too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

IDLE_S = 60.0  # a shared server outlives its last stage this long: the gap between stages


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def _home() -> Path:
    return Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))


# Run in the server's process before it execs the server: SIGTERM when the run's process
# (argv[1]) dies, even by SIGKILL or hangup, so no server outlives it (Linux's
# PR_SET_PDEATHSIG, kept across exec; a no-op elsewhere).
_EXEC_DYING_WITH_PARENT = """
import ctypes, os, signal, sys
if sys.platform == "linux":
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def _start(port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """`prefect server start` on 127.0.0.1:port, in its own session: a Ctrl-C on the run's
    terminal reaches the run, which stops the server after the flow has recorded on it how the
    run ended; and it dies with the process that started it (a run, or the shared server's
    supervisor), even one killed outright."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = ["-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    args = ["-c", _EXEC_DYING_WITH_PARENT, str(os.getpid()), *server]
    return subprocess.Popen(
        [sys.executable, *args], stdout=log, stderr=log, env=env, start_new_session=True
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def _wait_healthy(api_url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not _healthy(api_url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Prefect server did not start; see {log}")
        time.sleep(0.3)


@contextlib.contextmanager
def local_server(timeout: float = 90.0) -> Iterator[str]:
    """Yield an API URL: the configured one if set, else a server started here and stopped after."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        yield configured
        return
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log = _home() / "genpipe-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = _start(port, out)
    try:
        _wait_healthy(api_url, proc, timeout, log)
        os.environ["PREFECT_API_URL"] = api_url
        yield api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        _stop(proc)


@contextlib.contextmanager
def _locked(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[IO[str]]:
    with path.open("a") as fh:
        fcntl.flock(fh, mode)
        yield fh


def _running(state: Path) -> str | None:
    """The shared server's URL if one answers."""
    try:
        url = str(json.loads((state / "server.json").read_text())["url"])
    except (OSError, ValueError, KeyError):
        return None
    return url if _healthy(url) else None


@contextlib.contextmanager
def shared_server(timeout: float = 90.0, idle_s: float = IDLE_S) -> Iterator[str]:
    """Yield the URL of this PREFECT_HOME's shared server, starting it if none answers; the
    lease held until exit keeps the server up while this process runs."""
    state = _home() / "genpipe-shared"
    state.mkdir(parents=True, exist_ok=True)
    lease = (state / "lease").open("a")
    try:
        with _locked(state / "start.lock"):  # one starter; the server cannot stop meanwhile
            url = _running(state)
            if url is None:
                url = _spawn(state, timeout, idle_s)
            fcntl.flock(lease, fcntl.LOCK_SH)
        yield url
    finally:
        lease.close()


def _spawn(state: Path, timeout: float, idle_s: float) -> str:
    (state / "server.json").unlink(missing_ok=True)
    log = state / "server.log"
    with log.open("ab") as out:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "genpipe.prefect_server", str(state), str(idle_s)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # outlives this stage; Ctrl-C on the repro does not reach it
        )
    deadline = time.monotonic() + timeout
    while (url := _running(state)) is None:
        if supervisor.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"shared Prefect server did not start; see {log}")
        time.sleep(0.3)
    return url


def serve_shared(state: Path, idle_s: float, timeout: float = 90.0) -> None:
    """The detached side of `shared_server`: run a server until no lease has been held for
    `idle_s`. The decision to stop is taken under the start lock, so no stage can join a
    server that is going away."""
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log = state / "server.log"
    with log.open("ab") as out:
        proc = _start(port, out)
    try:
        _wait_healthy(api_url, proc, timeout, log)
        tmp = state / f"server.json.{os.getpid()}"
        tmp.write_text(json.dumps({"url": api_url, "pid": os.getpid()}))
        tmp.replace(state / "server.json")
        idle_since: float | None = None
        while proc.poll() is None:
            time.sleep(0.5)
            with _locked(state / "start.lock"), (state / "lease").open("a") as lease:
                try:
                    fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    idle_since = None
                    continue
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= idle_s:
                    (state / "server.json").unlink(missing_ok=True)
                    return
    finally:
        _stop(proc)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds serve_shared, which stops its server


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    serve_shared(Path(sys.argv[1]), float(sys.argv[2]))
