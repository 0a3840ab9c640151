"""Warm processes that fork stage commands, so torch, MLflow, Prefect and the stage modules
(~3-4 CPU s a process) are imported once, not once per stage.

DVC still runs every stage: it decides what is stale, restores from its run cache, writes
dvc.lock and the run cache, exactly as before. Only the command it starts is cheaper:
`python -m flows.stage NAME`, before importing torch, hands its arguments, working folder,
environment and stdout/stderr to a warm process, which forks a child that runs the stage as
the stage process would have (`flows.stage.main`). The command exits with the child's code;
a SIGTERM or Ctrl-C to the command reaches the child, and if the command dies (SIGKILL
included) the child is stopped. Each stage still runs in a fresh process forked before any
stage ran, so one stage's state never leaks into the next.

Two warm processes serve this way:
- a pipeline's (`make repro`): `WARM_ENV` names its socket; started and stopped by
  flows.pipeline.warm_stages, it exits with the pipeline;
- a checkout's (a plain `dvc repro`, `dvc exp run`): started detached by the first stage
  command DVC runs, shared by the later ones of the same checkout, code and environment,
  gone when idle or when the code changes (flows.warm_shared).

`GENPIPE_WARM=0` turns both off. Neither is used under `torchrun` (its ranks are processes
of their own) or off Linux (forking a process that imported torch is unsafe on macOS).

    python -m flows.warm SOCKET     # a pipeline's, started by flows.pipeline.warm_stages
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

WARM_ENV = "GENPIPE_WARM_SOCKET"  # the warm process's socket, for the stages of one pipeline
SWITCH_ENV = "GENPIPE_WARM"  # "0": every stage command runs by itself
RANK_ENVS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")  # set by torchrun for each rank
MAX_REQUEST = 1 << 20
GRACE_S = 30.0  # a stage whose command died gets this long to unwind after SIGTERM


def usable() -> bool:
    """Whether stage commands may run in a warm process here and now."""
    return (
        os.environ.get(SWITCH_ENV, "1") != "0"
        and not any(k in os.environ for k in RANK_ENVS)
        and sys.platform.startswith("linux")
        and hasattr(os, "fork")
    )


def preload(with_prefect: bool = False) -> None:
    """What every stage process imports, and the MLflow SQL store's modules (~1 s of its
    set-up), and torch.export, which MLflow imports (~0.25 s) when a stage logs a model;
    with `with_prefect`, what a stage flow imports too. Nothing that opens a file, a
    connection or a thread a child would share."""
    import mlflow  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import torch  # noqa: F401
    import torch.export  # noqa: F401

    import flows.stage  # noqa: F401
    import genpipe.runtime  # noqa: F401
    from genpipe.stages import STAGES, load

    for name in STAGES:
        load(name)
    if with_prefect:
        import prefect.runtime.flow_run  # noqa: F401
        from prefect import flow, task  # noqa: F401

        import genpipe.prefect_server  # noqa: F401


def _child(request: dict[str, Any], fds: list[int]) -> int:
    """In the forked child: become the stage command (its folder, environment, output)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stage.main installs its own
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C unwinds, as in a process
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=True, write_through=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True, write_through=True)  # type: ignore[union-attr]
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["sys_argv"]  # what MLflow records as the run's source
    from flows import stage

    try:
        stage.main(request["argv"])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: BLE001 - printed as the stage process would
        sys.excepthook(*sys.exc_info())
        return 130 if isinstance(exc, KeyboardInterrupt) else 1  # Ctrl-C/SIGTERM as a shell
    return 0


def _wait(conn: socket.socket, pid: int) -> int:
    """The child's exit status. If the command that asked for it goes away first (its end
    of `conn` closes: killed, SIGKILL included, so it forwarded nothing), the child is
    stopped as DVC would stop a stage: SIGTERM, then SIGKILL after GRACE_S."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3): wait without watching
        return os.waitpid(pid, 0)[1]
    try:
        ready, _, _ = select.select([conn.fileno(), pidfd], [], [])
        if pidfd not in ready:  # the command hung up before the child ended
            os.kill(pid, signal.SIGTERM)
            if not select.select([pidfd], [], [], GRACE_S)[0]:
                os.kill(pid, signal.SIGKILL)
    finally:
        os.close(pidfd)
    return os.waitpid(pid, 0)[1]


def _reap(conn: socket.socket, pid: int, ended: Callable[[], None]) -> None:
    """Tell the command its child's pid, then its exit code."""
    try:
        with conn:
            with contextlib.suppress(OSError):  # the command went away (killed)
                conn.sendall(f"{pid}\n".encode())
            code = os.waitstatus_to_exitcode(_wait(conn, pid))
            with contextlib.suppress(OSError):
                conn.sendall(f"{128 - code if code < 0 else code}\n".encode())
    finally:
        ended()


def _read_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 2)
    while not data.endswith(b"\n"):
        more = conn.recv(MAX_REQUEST)
        if not more:
            raise ConnectionError("request cut short")
        data += more
    return json.loads(data), list(fds)


class _Children:
    """How many children run, and since when none has."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.idle_since = time.monotonic()

    def started(self) -> None:
        with self.lock:
            self.running += 1

    def ended(self) -> None:
        with self.lock:
            self.running -= 1
            self.idle_since = time.monotonic()

    def idle_s(self) -> float | None:
        """Seconds since the last child ended; None while one runs."""
        with self.lock:
            return None if self.running else time.monotonic() - self.idle_since


def _fork(request: dict[str, Any], fds: list[int], close: list[socket.socket]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for sock in close:
            sock.close()
        code = 1
        try:
            code = _child(request, fds)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    for fd in fds:
        os.close(fd)
    return pid


def _close(server: socket.socket, path: str, inode: int) -> None:
    """Stop listening: the path first (only if it is still ours), so a command either finds
    no socket and starts another warm process, or connected before and sees this one hang up
    before naming a child (and tries again)."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    server.setblocking(False)
    with contextlib.suppress(OSError):
        while True:
            server.accept()[0].close()
    server.close()


def serve(path: str, done: Callable[[float], bool], with_prefect: bool = False) -> None:
    """Fork a child per request on the socket at `path` until SIGTERM, or until `done(idle)`
    says so while no child runs (`idle`: seconds since the last one ended)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds: the socket is removed
    preload(with_prefect)
    # what it imported stays: a child's collections skip it (a full one took 0.5 s)
    gc.freeze()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}"
    server.bind(tmp)
    server.listen()
    server.settimeout(1.0)
    inode = os.stat(tmp).st_ino
    os.rename(tmp, path)  # ready: the path appears only once it accepts
    children = _Children()
    try:
        while True:
            idle = children.idle_s()
            if idle is not None and done(idle):
                return
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            try:
                request, fds = _read_request(conn)
            except (OSError, ValueError):
                conn.close()
                continue
            children.started()
            pid = _fork(request, fds, [server, conn])
            threading.Thread(target=_reap, args=(conn, pid, children.ended), daemon=True).start()
    finally:
        _close(server, path, inode)


def hand_off(path: str, argv: list[str], env: dict[str, str]) -> int | None:
    """Run the stage command `argv` in a child of the warm process at `path`: its exit
    code, or None when that process cannot (none listens, or it hung up before starting a
    child, e.g. exiting when idle), so the caller may start one or run the stage itself."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    request = {"argv": argv, "sys_argv": sys.argv, "cwd": os.getcwd(), "env": env}
    sys.stdout.flush()
    sys.stderr.flush()
    # The child is in another session: SIGTERM and SIGINT are forwarded to it. A signal that
    # comes before its pid (the child may already run) waits for it rather than killing this
    # command, which would leave the child to the warm process's SIGKILL-style clean-up.
    child: list[int] = []
    pending: list[int] = []

    def forward(num: int, _frame: object) -> None:
        if child:
            os.kill(child[0], num)
        else:
            pending.append(num)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    with conn, conn.makefile("r") as answers:
        try:
            socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [1, 2])
            child.append(int(answers.readline()))
        except (OSError, ValueError):  # no child was started: the signals are this command's
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for num in pending:
                os.kill(os.getpid(), num)
            return None
        for num in pending:
            os.kill(child[0], num)
        code = answers.readline()
    return int(code) if code.strip() else 1  # the warm process died under it


def run_warm(argv: list[str]) -> int | None:
    """In a stage command: run it in a child of a warm process; its exit code, or None when
    none can serve it (the command then runs by itself, as before)."""
    if not usable():
        return None
    env = dict(os.environ)
    if path := env.pop(WARM_ENV, None):  # a pipeline's
        return hand_off(path, argv, env)
    if env.get("DVC_STAGE"):  # started by a plain `dvc repro`: the checkout's
        from flows import warm_shared

        return warm_shared.run(argv, env)
    return None


def serve_pipeline(path: str) -> None:
    """A pipeline's warm process: serves until the pipeline (its parent) is gone."""
    parent = os.getppid()
    serve(path, lambda _idle: os.getppid() != parent)


def run_then_exit(main: Callable[[], None]) -> NoReturn:
    """Run a warm process's `main`, then end the process without the interpreter's clean-up:
    with torch and MLflow imported that took 2-3 s (measured), which a pipeline waited for
    after its last stage. That clean-up has nothing of ours to do: `serve` has removed the
    socket, and it would not wait for the (daemon) reaper threads either. An error is still
    printed, and exits 1."""
    code = 1
    try:
        main()
        code = 0
    except SystemExit as exc:  # SIGTERM's handler exits 0
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - printed, as the interpreter would
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # closed: nothing to keep
                stream.flush()
        os._exit(code)


if __name__ == "__main__":
    run_then_exit(lambda: serve_pipeline(sys.argv[1]))
