"""The warm process of a checkout (flows.warm_shared): stage commands a plain `dvc repro`
starts run in children of it, and it never serves changed code, lingers or orphans a stage.

Each test works on its own copy of the code (so editing it touches nothing else), runs the
stage commands as DVC does (DVC_STAGE, DVC_ROOT set) and stops any warm process it started.
A stage command here is `prepare` with params it refuses (exit 2, in the command's own
stderr): the warm process's fork and hand-off are what is tested, not a stage's work."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from subprocess import DEVNULL, PIPE

import psutil
import pytest

from flows import warm, warm_shared
from flows.stage import PIPELINE_TASK_ENV
from genpipe import locks
from genpipe.data.raw import write_raw
from genpipe.data.sources import load_source
from tests.conftest import REPO, STAGE_COMMAND

WARM_EXIT = "exit 2 False"  # refused in a child of the warm process: no torch here
COLD_EXIT = "exit 2 True"  # refused by the command itself, which imported torch


@pytest.fixture
def checkout(tmp_path):
    """A copy of the code and a params file the stage refuses; its warm processes stopped
    (with their children) at the end, whatever happened."""
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "bad.yaml").write_text("base: {seed: not-a-number}\n")
    yield root
    for pid in warm_processes(root):
        try:
            proc = psutil.Process(pid)
            children = proc.children(recursive=True)
            proc.terminate()  # it removes its files
            psutil.wait_procs([proc], timeout=10)
            for child in [*children, proc]:
                child.kill()
        except psutil.Error:
            pass


def env_of(root: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}",
        "DVC_STAGE": "prepare",
        "DVC_ROOT": str(root),
        warm_shared.IDLE_ENV: "30",
    }
    env.pop(warm.WARM_ENV, None)
    env.pop(warm.SWITCH_ENV, None)
    return {**env, **extra}


def stage_command(root: Path, params: str = "bad.yaml", **extra: str) -> list[str]:
    """stdout's last line and stderr of one stage command."""
    out = subprocess.run(
        [sys.executable, "-c", STAGE_COMMAND, "prepare", params],
        cwd=root,
        env=env_of(root, **extra),
        capture_output=True,
        text=True,
        timeout=400,
    )
    return [(out.stdout.strip().splitlines() or [""])[-1], out.stderr]


def warm_processes(root: Path) -> dict[int, str]:
    """The live warm processes serving `root`, from their state files: pid -> key."""
    folder = warm_shared.folder()
    found = {}
    for state in folder.glob("*.json") if folder else []:
        try:
            info = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        if info["root"] == os.path.realpath(root) and not gone(info["pid"]):
            found[info["pid"]] = state.stem
    return found


def holds(proc: psutil.Process, path: Path) -> bool:
    """Whether `proc` has `path` open (a stage waiting for that lock)."""
    try:
        return any(f.path == str(path) for f in proc.open_files())
    except psutil.Error:
        return False


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(check, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_warm_is_off_when_switched_off_under_torchrun_or_off_linux(monkeypatch):
    for name in (warm.SWITCH_ENV, *warm.RANK_ENVS):
        monkeypatch.delenv(name, raising=False)
    assert warm.usable() == sys.platform.startswith("linux")
    monkeypatch.setattr(sys, "platform", "linux")
    assert warm.usable()
    for name, value in [(warm.SWITCH_ENV, "0"), *((rank, "1") for rank in warm.RANK_ENVS)]:
        monkeypatch.setenv(name, value)
        assert not warm.usable(), name
        monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not warm.usable()


def test_stage_commands_share_one_warm_process_that_exits_when_idle(checkout):
    first = stage_command(checkout, **{warm_shared.IDLE_ENV: "10"})
    assert first[0] == WARM_EXIT, first
    assert "base.seed" in first[1] and "genpipe prepare: error:" in first[1]
    ((started, key),) = warm_processes(checkout).items()
    second = stage_command(checkout, **{warm_shared.IDLE_ENV: "10"})
    assert second[0] == WARM_EXIT and "base.seed" in second[1], second
    assert list(warm_processes(checkout)) == [started]  # the same one served it
    # switched off: the command runs the stage itself, and the warm process is not asked
    assert stage_command(checkout, **{warm.SWITCH_ENV: "0"})[0] == COLD_EXIT
    assert wait_until(lambda: gone(started), 60), "the warm process outlived its idle time"
    assert list(warm_shared.folder().glob(f"{key}.*")) == []  # its socket, lock, state, log


def test_edited_code_gets_a_fresh_warm_process_and_the_stale_one_exits(checkout):
    assert stage_command(checkout)[0] == WARM_EXIT
    (stale,) = warm_processes(checkout)
    config = checkout / "src/genpipe/config.py"
    config.write_text(config.read_text().replace("invalid parameters", "edited: invalid params"))
    edited = stage_command(checkout)
    assert edited[0] == WARM_EXIT and "edited: invalid params" in edited[1], edited
    assert wait_until(lambda: gone(stale), 30), "a warm process with stale code lingered"
    (fresh,) = warm_processes(checkout)
    assert fresh != stale


def test_a_killed_stage_command_stops_its_child(checkout):
    """A SIGTERM to the command reaches its child; a SIGKILL (which it cannot forward) to
    the command makes the warm process stop the child. The child, a real `prepare`, waits
    for the tracking store's creation lock, which the test holds: a long stage."""
    write_raw(load_source("digits"), checkout / "data/raw")
    (checkout / "params.yaml").write_text((REPO / "params.yaml").read_text())
    store = checkout / "mlflow.db"
    env = env_of(checkout, MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    env[PIPELINE_TASK_ENV] = "repro --single-item prepare"  # the stage itself, no Prefect flow
    cmd = [sys.executable, "-m", "flows.stage", "prepare"]
    lock = Path(f"{store}.init.lock")
    with locks.waiting(lock):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            command = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=DEVNULL, stderr=PIPE)
            try:
                assert wait_until(lambda: bool(warm_processes(checkout)), 300)
                (server,) = warm_processes(checkout)
                assert wait_until(lambda s=server: bool(psutil.Process(s).children()), 120)
                (child,) = psutil.Process(server).children()
                # signal the stage once it runs: blocked on the lock, its SIGTERM handler is in
                # place (a signal in the child's first instants finds the default, as it would
                # in a stage process of its own, and kills it: 143, seen under load)
                assert wait_until(lambda c=child: holds(c, lock), 120), "the stage never started"
                command.send_signal(sig)
                code = command.wait(timeout=60)
                assert wait_until(lambda c=child: gone(c.pid), 60), f"{sig!r}: the child runs"
                if sig == signal.SIGTERM:  # it unwound as a stage process does on SIGTERM
                    err = command.stderr.read()  # the child, which wrote it too, is gone
                    assert code == 130 and b"stopped by signal 15" in err, err
            finally:
                command.kill()
                command.wait()
                command.stderr.close()


HAND_OFF = "import sys; from flows.warm import hand_off; sys.exit(hand_off(sys.argv[1], [], {}))"


def test_a_signal_before_the_childs_pid_is_forwarded_once_it_comes(tmp_path):
    """The warm process may fork the child before the command has read its pid: a SIGTERM
    then must wait for the pid and reach the child, not kill the command (which left the
    child to be stopped only when the warm process noticed the hang-up)."""
    import socket

    path = str(tmp_path / "sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = subprocess.Popen([sys.executable, "-c", HAND_OFF, path], env=env)
    child = subprocess.Popen(["sleep", "60"])
    try:
        server.settimeout(60)
        conn, _ = server.accept()
        with conn:
            socket.recv_fds(conn, 1 << 20, 2)  # the request: the child "is forked" now
            command.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert command.poll() is None, "the SIGTERM killed the command"
            conn.sendall(f"{child.pid}\n".encode())
            assert child.wait(timeout=30) == -signal.SIGTERM  # forwarded once the pid came
            conn.sendall(b"143\n")
        assert command.wait(timeout=30) == 143
    finally:
        for proc in (command, child):
            proc.kill()
            proc.wait()
        server.close()


# A warm process's main, then whether the interpreter's clean-up (an atexit hook) ran.
QUICK_EXIT = """
import atexit, sys
from flows.warm import run_then_exit
atexit.register(print, "clean-up ran")
def main():
    print("served")
    {body}
run_then_exit(main)
"""


@pytest.mark.parametrize(
    ("body", "code", "err"),
    [("pass", 0, ""), ("sys.exit(3)", 3, ""), ("raise ValueError('boom')", 1, "ValueError: boom")],
)
def test_a_warm_process_ends_without_the_interpreters_clean_up(body, code, err):
    """That clean-up took 2-3 s with torch and MLflow imported, and a pipeline waited for
    it; the exit code and an error's traceback stay what they were."""
    out = subprocess.run(
        [sys.executable, "-c", QUICK_EXIT.format(body=body)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.returncode, out.stdout) == (code, "served\n"), out
    assert err in out.stderr
