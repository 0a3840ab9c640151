"""How stages are orchestrated: output streamed as it happens into the run's log at INFO, one
Prefect flow per stage and no more, a shared server for plain `dvc repro`, command-line help,
and device resolution."""

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from flows import pipeline, stage
from genpipe import cli, prefect_server, runtime, training
from genpipe.config import ParamsError, parse_params
from genpipe.stages import STAGES
from tests.conftest import REPO, STAGE_COMMAND, copy_repo, git, run
from tests.tiny import write_tiny_params

# Prints without flushing, a progress bar redrawn with carriage returns, and pauses between.
FAKE_STAGE = """
import sys, time
for i in range(3):
    print(f"line {i}")
    time.sleep(0.7)
sys.stderr.write("\\rbar 1/2")
sys.stderr.flush()
time.sleep(0.7)
sys.stderr.write("\\rbar 2/2\\n")
"""


class Arrivals(logging.Handler):
    """Each record with the moment it was logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[float, logging.LogRecord]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((time.monotonic(), record))


@pytest.fixture
def arrivals():
    handler = Arrivals()
    loggers = [pipeline.LOG, logging.getLogger("prefect.task_runs")]
    for logger in loggers:
        logger.addHandler(handler)
    pipeline.LOG.setLevel(logging.INFO)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def test_stage_output_is_logged_line_by_line_as_it_is_printed(arrivals, monkeypatch):
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # the stage's prints are buffered
    code, lines = pipeline.stream([sys.executable, "-c", FAKE_STAGE])
    ended = time.monotonic()
    assert code == 0
    assert lines == ["line 0", "line 1", "line 2", "bar 1/2", "bar 2/2"]
    got = {r.getMessage(): (t, r.levelno) for t, r in arrivals.seen}
    assert list(got) == lines and {level for _, level in got.values()} == {logging.INFO}
    # streamed, not collected at the end: the first line was there ~2.8 s before the last
    assert got["line 2"][0] - got["line 0"][0] > 1.0
    assert ended - got["line 0"][0] > 1.5


def test_progress_bar_off_a_terminal_writes_whole_lines(capsys):
    bar = training.progress(100, "tokenizer")
    bar.update(40)
    bar.refresh()
    bar.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and err.endswith("\n")
    assert lines[0].startswith("tokenizer:   0%") and lines[-1].startswith("tokenizer:  40%")


def test_stage_output_lands_in_the_prefect_run_log_at_info(arrivals, prefect_api):
    from prefect import flow, task
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @task
    def fake_stage() -> int:
        return pipeline.stream([sys.executable, "-c", "print('hello from the stage')"])[0]

    @flow
    def fake_pipeline() -> int:
        return fake_stage()

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        assert fake_pipeline() == 0
    found = [r for _, r in arrivals.seen if r.getMessage() == "hello from the stage"]
    assert len(found) == 1
    assert found[0].name == "prefect.task_runs" and found[0].levelno == logging.INFO
    assert getattr(found[0], "task_run_id", None)  # tied to the task run the UI shows


def test_prefect_run_logs_default_to_info():
    script = (
        "import flows; from prefect.logging.configuration import setup_logging; "
        "from prefect.logging import get_logger; setup_logging(); "
        "print(get_logger('prefect.task_runs').getEffectiveLevel())"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_LEVEL"}
    env["PYTHONPATH"] = f"{REPO / 'src'}{os.pathsep}{REPO}"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(logging.INFO), out.stderr[-2000:]


def test_stage_under_a_pipeline_task_runs_without_a_second_flow(tmp_path, monkeypatch):
    ran, flows = [], []
    monkeypatch.setattr(stage, "load_params", lambda path: "params")
    monkeypatch.setattr(stage, "check_reachable", lambda: None)
    monkeypatch.setattr(stage, "run_stage", lambda name, params: ran.append(name))
    monkeypatch.setattr(stage, "run_flow", lambda name, path: flows.append(name))
    monkeypatch.setattr(stage, "redact_tracebacks", lambda: None)
    monkeypatch.setattr(runtime, "stop_on_sigterm", lambda: None)
    monkeypatch.setenv(stage.PIPELINE_TASK_ENV, "repro --single-item prepare")
    stage.main(["prepare"])
    monkeypatch.delenv(stage.PIPELINE_TASK_ENV)
    stage.main(["judges"])
    assert ran == ["prepare"] and flows == ["judges"]


def test_pipeline_task_marks_its_dvc_run(monkeypatch):
    seen = {}

    def fake_stream(cmd, env):
        seen.update(cmd=cmd, env=env)
        return 0, ["Stage 'prepare' didn't change, skipping"]

    monkeypatch.setattr(pipeline, "stream", fake_stream)
    assert pipeline.repro_stage("prepare")["outcome"] == "up to date"
    assert seen["cmd"] == ["dvc", "repro", "--single-item", "prepare"]
    assert seen["env"][stage.PIPELINE_TASK_ENV]


@pytest.fixture
def prefect_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    yield tmp_path
    info = tmp_path / "genpipe-shared" / "server.json"
    if info.is_file():  # a failed test: stop the supervisor (it stops its server)
        with contextlib.suppress(ProcessLookupError):
            os.kill(json.loads(info.read_text())["pid"], 15)


def test_plain_dvc_repro_stages_share_one_server_that_stops_when_idle(prefect_home):
    with prefect_server.shared_server(idle_s=1.0) as first:
        with prefect_server.shared_server(idle_s=1.0) as second:
            assert first == second and prefect_server._healthy(first)
        time.sleep(2.0)  # idle_s passed for the inner lease, the outer one still holds it
        assert prefect_server._healthy(first)
    deadline = time.monotonic() + 30
    while prefect_server._healthy(first) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not prefect_server._healthy(first)
    assert not (prefect_home / "genpipe-shared" / "server.json").exists()


# The handler writes with os.write, not print: the Ctrl-C can land while print(url) is still
# inside stdout's buffered writer (the test reads the line as soon as it is in the pipe), and
# a print from the handler then fails as a reentrant call (seen once under CI's load).
RUN_WITH_A_SERVER = """
import os, signal, time
from genpipe.prefect_server import local_server
signal.signal(signal.SIGINT, lambda *_: os.write(1, b"interrupted\\n"))
with local_server() as url:
    print(url, flush=True)
    time.sleep(600)
"""


def _servers_on(url: str) -> list[psutil.Process]:
    port = url.rsplit(":", 1)[1].split("/")[0]
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "server" in cmd and "--port" in cmd and cmd[cmd.index("--port") + 1] == port:
            found.append(proc)
    return found


def test_a_runs_server_is_out_of_ctrl_cs_reach_and_dies_with_the_run(prefect_home):
    """make repro's server: a Ctrl-C on the terminal reaches the run, not the server (the flow
    still reports to it how the run ended; a dead one hung make repro for a minute), and the
    server does not outlive a run killed outright."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    run = subprocess.Popen(
        [sys.executable, "-c", RUN_WITH_A_SERVER],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # a group of its own, as a terminal's foreground job
    )
    url = ""
    try:
        url = run.stdout.readline().strip()  # local_server bounds the wait for the server
        assert prefect_server._healthy(url)
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C sends the foreground group
        assert run.stdout.readline().strip() == "interrupted"
        time.sleep(1.0)
        assert prefect_server._healthy(url), "Ctrl-C on the run stopped its server"
        run.kill()
        run.wait(timeout=10)
        deadline = time.monotonic() + 30
        while _servers_on(url) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not _servers_on(url), "the server outlived its run"
    finally:
        run.kill()
        for proc in _servers_on(url) if url else []:
            proc.kill()


def test_flows_stage_help_lists_the_stages_without_starting_anything():
    script = (
        "import runpy, sys\n"
        "sys.argv = ['flows.stage', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('flows.stage', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'prefect' in sys.modules, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    for args in (["--help"], ["prior", "--help"]):
        out = subprocess.run(
            [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True
        )
        assert out.stdout.strip().endswith("exit 0 False False"), out.stderr[-2000:]
        assert "usage: python -m flows.stage" in out.stdout
        assert all(name in out.stdout for name in STAGES)


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


@pytest.mark.parametrize("build", [cli.build_parser, stage.parser, pipeline.parser])
def test_every_option_has_help_and_shows_its_default(build, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # no wrapping inside a default
    for parser in _parsers(build()):
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            assert action.help, f"{parser.prog}: {action.dest} has no help"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in text, f"{parser.prog}: {action.dest}"


def test_mps_is_a_device_where_torch_has_it(monkeypatch):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["base"]["device"] = "mps"
    assert parse_params(raw).base.device == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.pick_device("mps") == torch.device("mps")
    assert runtime.pick_device("auto") == torch.device("cpu")  # mps only when named
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ParamsError, match=r"base\.device is 'mps'.*'cpu'"):
        runtime.pick_device("mps")


def _stage_command(tmp_path, warm_socket: str) -> subprocess.CompletedProcess:
    """`python -m flows.stage prepare bad.yaml` as a pipeline task's `dvc repro` runs it."""
    (tmp_path / "bad.yaml").write_text("base: {seed: not-a-number}\n")
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
        stage.PIPELINE_TASK_ENV: "repro --single-item prepare",
        "GENPIPE_WARM_SOCKET": warm_socket,
    }
    return subprocess.run(
        [sys.executable, "-c", STAGE_COMMAND, "prepare", "bad.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_pipeline_stage_commands_run_in_the_warm_process(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PYTHONPATH", f"{REPO / 'src'}{os.pathsep}{REPO}")
    with pipeline.warm_stages() as ready:
        assert "GENPIPE_WARM_SOCKET" not in os.environ  # not named before it listens
        ready()
        warm = os.environ["GENPIPE_WARM_SOCKET"]
        out = _stage_command(tmp_path, warm)
    # the stage ran (its params refused, exit 2, in the command's own stderr and folder)
    # in a child of the warm process: the command itself never imported torch
    assert out.stdout.strip().endswith("exit 2 False"), out.stdout + out.stderr[-2000:]
    assert "genpipe prepare: error:" in out.stderr and "base.seed" in out.stderr
    assert "GENPIPE_WARM_SOCKET" not in os.environ
    # without a warm process the command runs the stage itself, as before
    alone = _stage_command(tmp_path, warm)
    assert alone.stdout.strip().endswith("exit 2 True"), alone.stdout + alone.stderr[-2000:]
    assert "base.seed" in alone.stderr


def test_make_repro_starts_the_warm_process_while_the_server_starts(monkeypatch):
    """Its imports (torch, MLflow) and the Prefect server's start overlap; the flow's stages
    find it listening."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PYTHONPATH", f"{REPO / 'src'}{os.pathsep}{REPO}")
    monkeypatch.delenv("GENPIPE_WARM_SOCKET", raising=False)
    seen = {}

    @contextlib.contextmanager
    def server():
        argvs = []  # a session's Prefect server may be a child too, an ended one a zombie
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                argvs.append(child.cmdline()[1:3])
        seen["warm process beside the server"] = ["-m", "flows.warm"] in argvs
        yield "http://127.0.0.1:9/api"

    def flow():
        seen["socket when the flow starts"] = os.path.exists(os.environ["GENPIPE_WARM_SOCKET"])
        return []

    monkeypatch.setattr(pipeline, "local_server", server)
    monkeypatch.setattr(pipeline, "pipeline_flow", flow)
    pipeline.main([])
    assert seen == {"warm process beside the server": True, "socket when the flow starts": True}
    assert "GENPIPE_WARM_SOCKET" not in os.environ


def _tiny_copies(tmp_path: Path, names: list[str]) -> list[Path]:
    """Clones of one commit of the project with tiny params, their data in place (the
    register stage records the commit, so all must share it)."""
    first, *others = (tmp_path / name for name in names)
    first.mkdir()
    copy_repo(first)
    write_tiny_params(first)
    git(first, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "tiny params")
    for repo in others:
        git(tmp_path, "clone", "-q", str(first), str(repo))
    for repo in (first, *others):
        run(["genpipe", "data", "ensure"], repo, {"MLFLOW_TRACKING_URI": None})
    return [first, *others]


def _run_cache(repo: Path) -> list[str]:
    runs = repo / ".dvc" / "cache" / "runs"
    return sorted(str(p.relative_to(runs)) for p in runs.rglob("*") if p.is_file())


@pytest.mark.slow
def test_warm_stages_leave_the_lock_and_run_cache_of_cold_ones(tmp_path, prefect_home):
    """`make repro` (its pipeline's warm process), a plain `dvc repro` (the checkout's warm
    process) and a plain `dvc repro` with GENPIPE_WARM=0 (every stage its own process)."""
    env = {"MLFLOW_TRACKING_URI": None}
    piped, warm, cold = _tiny_copies(tmp_path, ["piped", "warm", "cold"])
    rows = run(["python", "-m", "flows.pipeline"], piped, env).strip().splitlines()
    assert [row.split()[1] for row in rows[-len(STAGES) :]] == ["ran"] * len(STAGES)
    run(["dvc", "repro"], warm, env)
    run(["dvc", "repro"], cold, {**env, "GENPIPE_WARM": "0"})
    # the same stages, deps, params and output md5s, and the same run-cache entries
    locks = [yaml.safe_load((r / "dvc.lock").read_text()) for r in (piped, warm, cold)]
    assert locks[0] == locks[1] == locks[2]
    assert _run_cache(piped) == _run_cache(warm) == _run_cache(cold) != []
    assert "up to date" in run(["dvc", "status"], warm, env)
    # the warm process's children still found their DVC process: one parent run, finished
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{warm / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("genpipe").experiment_id])
    stage_runs = [r for r in found if "dvc.stage" in r.data.tags]
    (top,) = [r for r in found if r.data.tags.get("genpipe.parent") == "true"]
    assert len(stage_runs) == len(STAGES) and top.info.status == "FINISHED"
    assert top.data.tags["genpipe.pipeline"].startswith("dvc:")
    assert {r.data.tags.get("mlflow.parentRunId") for r in stage_runs} == {top.info.run_id}
    sources = {r.data.tags["mlflow.source.name"] for r in stage_runs}  # as a cold process's
    assert sources == {str(warm / "flows" / "stage.py")}, sources


def test_a_stage_flow_leaves_no_pointer_to_the_shared_server(monkeypatch):
    """The shared server stops when idle: a process that ran a stage must not keep
    PREFECT_API_URL pointing at it (a later flow in that process would find it dead)."""
    import contextlib

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    seen = []

    @contextlib.contextmanager
    def fake_server():
        yield "http://127.0.0.1:9/api"

    monkeypatch.setattr(prefect_server, "shared_server", fake_server)
    monkeypatch.setattr(
        stage, "stage_flow", lambda name: lambda path: seen.append(os.environ["PREFECT_API_URL"])
    )
    stage.run_flow("prepare", "params.yaml")
    assert seen == ["http://127.0.0.1:9/api"] and "PREFECT_API_URL" not in os.environ
