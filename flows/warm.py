"""A warm process that forks the stage commands of a `make repro` run, so torch, MLflow and
the stage modules (~3 CPU s a process) are imported once per pipeline, not once per stage.

DVC still runs every stage: `dvc repro --single-item` decides what is stale, restores from
its run cache, writes dvc.lock and the run cache, exactly as before. Only the command it
starts is cheaper: `python -m flows.stage NAME` sees `WARM_ENV` (set by flows.pipeline for
its `dvc repro` processes) and, before importing torch, hands its arguments, working folder,
environment and stdout/stderr to this process, which forks a child that runs the stage as
the stage process would have (`flows.stage.main`). The command exits with the child's code,
and a SIGTERM to the command reaches the child. Each stage still runs in a fresh process
(forked before any stage ran), so one stage's state never leaks into the next.

    python -m flows.warm SOCKET     # started and stopped by flows.pipeline.warm_stages
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
from typing import Any

WARM_ENV = "GENPIPE_WARM_SOCKET"  # the warm process's socket, for the stages of one pipeline
MAX_REQUEST = 1 << 20


def preload() -> None:
    """What every stage process imports, and the MLflow SQL store's modules (~1 s of its
    set-up); nothing that opens a file, a connection or a thread a child would share."""
    import mlflow  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import torch  # noqa: F401

    import flows.stage  # noqa: F401
    import genpipe.runtime  # noqa: F401
    from genpipe.stages import STAGES, load

    for name in STAGES:
        load(name)


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
    from flows import stage

    try:
        stage.main(request["argv"])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - printed as the stage process would, then exit 1
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


def _reap(conn: socket.socket, pid: int) -> None:
    """Tell the command its child's pid, then its exit code."""
    with conn:
        with contextlib.suppress(OSError):  # the command went away (killed)
            conn.sendall(f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(OSError):
            conn.sendall(f"{128 - code if code < 0 else code}\n".encode())


def _read_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 2)
    while not data.endswith(b"\n"):
        more = conn.recv(MAX_REQUEST)
        if not more:
            raise ConnectionError("request cut short")
        data += more
    return json.loads(data), list(fds)


def serve(path: str) -> None:
    """Fork a child per request on the socket at `path` until SIGTERM, or until the process
    that started it (the pipeline) is gone."""
    parent = os.getppid()
    preload()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen()
    server.settimeout(1.0)
    os.rename(path + ".tmp", path)  # ready: the path appears only once it accepts
    try:
        while os.getppid() == parent:
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
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                code = 1
                try:
                    code = _child(request, fds)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            threading.Thread(target=_reap, args=(conn, pid), daemon=True).start()
    finally:
        server.close()
        os.unlink(path)


def run_warm(argv: list[str]) -> int | None:
    """In a stage command: run it in a child of the warm process; its exit code, or None
    when there is no warm process to ask (the command then runs by itself, as before)."""
    path = os.environ.get(WARM_ENV)
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    env = {k: v for k, v in os.environ.items() if k != WARM_ENV}
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env}) + "\n"
    sys.stdout.flush()
    sys.stderr.flush()
    with conn, conn.makefile("r") as answers:
        socket.send_fds(conn, [request.encode()], [1, 2])
        pid = int(answers.readline())
        for sig in (signal.SIGTERM, signal.SIGINT):  # the child is in another session
            signal.signal(sig, lambda num, _frame: os.kill(pid, num))
        code = answers.readline()
    return int(code) if code.strip() else 1  # the warm process died under it


if __name__ == "__main__":
    serve(sys.argv[1])
