"""Faults a stage run meets in operation, each reproduced small: killed runs, concurrent
runs, torn or hostile checkpoints, an unreachable tracking server, changed data behind
DVC's back, an audit re-run writing into the project's run cache, leaked credentials."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from genpipe import cli, lineage, locks, outputs
from genpipe.checkpoint import Checkpoint, atomic_torch_save, rng_state
from genpipe.config import parse_params
from genpipe.data.raw import write_raw
from genpipe.data.sources import load_source
from genpipe.stages import finetune, prepare
from genpipe.tracking import parent, store
from tests.conftest import BIN, REPO

PYTHON = [sys.executable, "-c"]


def child_env(**extra: str) -> dict[str, str]:
    path = f"{REPO / 'src'}{os.pathsep}{REPO}"
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture
def workdir(tmp_path, monkeypatch, mlflow_uri):
    write_raw(load_source("digits"), tmp_path / "data/raw")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- 2. stale runs, SIGTERM and errors of `genpipe stage` --

KILLED_STAGE = (  # a stage's run, its process killed outright while it runs
    "import os, signal; from pathlib import Path; from genpipe.config import "
    "parse_params; from genpipe.tracking.write import stage_run\n"
    "with stage_run('prepare', parse_params({}), (), [], Path('.')) as run:\n"
    "    print(run.run_id, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
)


def test_run_left_running_by_sigkill_is_marked_killed_by_the_next_run(workdir):
    killed = subprocess.run(
        [*PYTHON, KILLED_STAGE],
        cwd=workdir,
        env=child_env(),
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL
    stale_id = killed.stdout.split()[0]
    client = store.client()
    other = client.create_run(
        client.get_experiment_by_name(store.EXPERIMENT).experiment_id,
        tags={"dvc.stage": "prepare", "genpipe.root": "/another/checkout"},
    ).info.run_id
    assert client.get_run(stale_id).info.status == "RUNNING"

    prepare.run(parse_params({}), workdir)
    stale = client.get_run(stale_id)
    assert stale.info.status == "KILLED"
    assert "marked KILLED" in stale.data.tags[store.STALE_TAG]
    assert client.get_run(other).info.status == "RUNNING"  # another checkout's: not ours


def test_pipeline_parent_left_running_by_a_killed_stage_is_marked_killed(workdir, monkeypatch):
    """A stage of a `dvc repro` killed outright leaves its pipeline's parent run RUNNING; the
    next stage run in the checkout marks it KILLED once the DVC process is gone (here a
    stand-in), and leaves a live pipeline's parent alone."""
    import psutil

    dvc = subprocess.Popen(["sleep", "120"])
    try:
        owner = parent.owner(psutil.Process(dvc.pid))
        group = parent.describe(f"dvc:{owner}", "dvc repro", {parent.OWNER_TAG: owner})
        killed = subprocess.run(
            [*PYTHON, KILLED_STAGE],
            cwd=workdir,
            env=child_env(**{parent.PIPELINE_ENV: group}),
            capture_output=True,
            text=True,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        client = store.client()
        (top,) = client.search_runs(
            [client.get_experiment_by_name(store.EXPERIMENT).experiment_id],
            f"tags.`{parent.KEY_TAG}` = 'dvc:{owner}' and tags.`{parent.PARENT_TAG}` = 'true'",
        )
        assert top.info.status == "RUNNING"
        monkeypatch.delenv(parent.PIPELINE_ENV, raising=False)
        monkeypatch.delenv("DVC_STAGE", raising=False)
        prepare.run(parse_params({}), workdir)  # its DVC process lives: it may go on
        assert client.get_run(top.info.run_id).info.status == "RUNNING"
    finally:
        dvc.kill()
        dvc.wait()
    prepare.run(parse_params({}), workdir)
    after = client.get_run(top.info.run_id)
    assert after.info.status == "KILLED"
    assert "a stage was killed" in after.data.tags[store.STALE_TAG]


def test_genpipe_stage_unwinds_on_sigterm(workdir):
    ready = workdir / "ready"
    script = (
        "import sys, time; from pathlib import Path; import genpipe.stages as s\n"
        "def slow(*a):\n"
        f"    Path({str(ready)!r}).touch(); time.sleep(60)\n"
        "s.run_stage = slow\n"
        "from genpipe.cli import main; sys.exit(main(['stage', 'prepare']))"
    )
    proc = subprocess.Popen(
        [*PYTHON, script], cwd=workdir, env=child_env(), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "stopped by signal 15" in err and "Traceback" not in err


def test_bad_model_file_is_named_not_a_traceback(workdir, capsys):
    bad = workdir / "models/tokenizer/model.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a model")
    assert cli.main(["stage", "tokenize"]) == 2
    err = capsys.readouterr().err
    assert "models/tokenizer/model.pt" in err and "Traceback" not in err


def test_unimportable_reward_entry_point_names_the_key(workdir, monkeypatch, capsys):
    from genpipe import rewards, stages

    def run_stage(name, params, root=Path(".")):
        rewards.load_entry_point("ink", "no_such_module_here:ink", root)

    monkeypatch.setattr(stages, "run_stage", run_stage)
    assert cli.main(["stage", "finetune"]) == 2
    err = capsys.readouterr().err
    assert "finetune.reward_entry_points.ink" in err and "no_such_module_here" in err


# -- 3. checkpoints: code in the fingerprint, weights_only loads, set aside when unreadable --


def test_checkpoint_fingerprint_follows_the_code(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def ink(images, labels):\n    return images\n")
    params = parse_params({"finetune": {"reward_entry_points": {"ink": "my_rewards:ink"}}})
    before = finetune.SPEC.code_digest(params, tmp_path)
    assert finetune.SPEC.start(params, tmp_path, deps=()).checkpoint.fingerprint.endswith(before)
    (tmp_path / "my_rewards.py").write_text("def ink(images, labels):\n    return -images\n")
    assert finetune.SPEC.code_digest(params, tmp_path) != before


def test_checkpoint_fingerprint_covers_the_stage_modules(tmp_path, monkeypatch):
    from genpipe import dvcyaml

    module = tmp_path / "stage_module.py"
    module.write_text("STEPS = 1\n")
    monkeypatch.setattr(dvcyaml, "code_deps", lambda name, src: [module])
    params = parse_params({})
    before = prepare.SPEC.code_digest(params, tmp_path)
    module.write_text("STEPS = 2\n")
    assert prepare.SPEC.code_digest(params, tmp_path) != before


class Payload:
    """Unpickling this object creates a file: what a hostile checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payload_in_checkpoint_is_refused_and_set_aside(tmp_path, capsys):
    path, marker = tmp_path / "last.pt", tmp_path / "pwned"
    state = {"fingerprint": "f", "rng": rng_state([]), "step": 3, "x": Payload(marker)}
    torch.save(state, path)
    assert Checkpoint(path, "f", 3).load() is None
    assert not marker.exists()
    assert not path.exists() and (tmp_path / "last.pt.rejected").is_file()
    assert "set aside" in capsys.readouterr().err


def test_torn_checkpoint_is_set_aside_and_a_good_one_loads(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"\x80\x02torn")
    assert Checkpoint(path, "f", 3).load() is None
    assert (tmp_path / "last.pt.rejected").is_file()
    atomic_torch_save({"fingerprint": "f", "rng": rng_state([]), "step": 3}, path)
    assert Checkpoint(path, "f", 3).load()["step"] == 3
    assert not list(tmp_path.glob("*.tmp"))


# -- 4. concurrency: one run of a stage per checkout, own temporaries, serialised store init --


def test_second_run_of_a_stage_is_refused_and_a_dead_holders_lock_taken_over(workdir):
    lock = workdir / ".genpipe/locks/prepare.lock"
    holder = subprocess.Popen(
        [
            *PYTHON,
            "import sys, time; from pathlib import Path; from genpipe import locks\n"
            f"with locks.exclusive(Path({str(lock)!r}), 'stage prepare'):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(locks.Busy, match=f"pid {holder.pid}"):
        prepare.run(parse_params({}), workdir)
    assert not (workdir / "data/prepared").exists()
    holder.kill()  # SIGKILL: the lock file stays, its flock goes with the process
    holder.wait()
    assert lock.read_text().strip() == str(holder.pid)
    prepare.run(parse_params({}), workdir)
    assert (workdir / "data/prepared/train/images.npy").is_file()


def test_temporaries_are_per_run_and_dead_runs_ones_are_swept(tmp_path):
    out = tmp_path / "data/codes"
    legacy, orphan = tmp_path / "data/.codes.tmp", tmp_path / "data/.codes.tmp-999999999"
    live = tmp_path / f"data/.codes.tmp-{os.getppid()}"
    for t in (legacy, orphan, live):
        t.mkdir(parents=True)
    with outputs.staged(out) as (tmp,):
        assert tmp.name == f".codes.tmp-{os.getpid()}"
        tmp.mkdir()
        (tmp / "codes.npy").write_bytes(b"x")
    assert (out / "codes.npy").is_file()
    assert not legacy.exists() and not orphan.exists() and live.exists()


def test_fresh_store_created_by_three_processes_at_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    procs = [
        subprocess.Popen(
            [*PYTHON, "from genpipe.tracking import store; store.mlflow()"],
            cwd=tmp_path,
            env=child_env(MLFLOW_TRACKING_URI=uri),
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors


# -- 5. the audit's re-run leaves the project's run cache alone --


def test_audit_rerun_writes_nothing_into_the_projects_run_cache(tmp_path):
    from genpipe.audit import rerun_steps

    project, clone = tmp_path / "project", tmp_path / "clone"
    project.mkdir()

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def sh(cmd: list[str], cwd: Path) -> None:
        subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)

    sh(["git", "init", "-q"], project)
    sh(["dvc", "init", "-q"], project)
    stage = {"cmd": "python -c \"import time; open('out.txt','w').write(str(time.time()))\""}
    (project / "in.txt").write_text("in")  # a stage without deps never enters the run cache
    dvc_yaml = {"stages": {"make": {**stage, "deps": ["in.txt"], "outs": ["out.txt"]}}}
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    sh(["dvc", "repro", "-q"], project)
    sh(["git", "add", "-A"], project)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x"], project)
    runs = project / ".dvc/cache/runs"
    before = sorted(p.relative_to(runs) for p in runs.rglob("*") if p.is_file())
    assert before  # the project's own run-cache entry
    sh(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    for cmd in rerun_steps(project, "make"):
        if cmd[1] != "checkout":  # the toy project has no data.dvc
            sh(cmd, clone)
    assert (clone / "out.txt").read_text() != (project / "out.txt").read_text()
    assert sorted(p.relative_to(runs) for p in runs.rglob("*") if p.is_file()) == before


# -- 6. the retrain flow refuses data changed behind DVC's back --


def versioned_raw(root: Path) -> None:
    raw = root / "data/raw"
    raw.mkdir(parents=True)
    (raw / "a.txt").write_text("a")
    (raw / "b.txt").write_text("b")
    md5 = lineage.dvc_md5(raw)
    manifest = root / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps(lineage.dir_entries(raw)))
    (root / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": md5, "path": "data/raw"}]}))


def test_changed_raw_data_stops_the_retrain_flow_naming_the_files(tmp_path, monkeypatch):
    from flows import pipeline

    versioned_raw(tmp_path)
    assert pipeline.check_data(tmp_path)
    (tmp_path / "data/raw/a.txt").write_text("edited")
    (tmp_path / "data/raw/c.txt").write_text("new")
    (tmp_path / "data/raw/b.txt").unlink()
    with pytest.raises(pipeline.DataChanged) as caught:
        pipeline.check_data(tmp_path)
    text = str(caught.value)
    assert "added: c.txt" in text and "removed: b.txt" in text and "changed: a.txt" in text
    assert "dvc checkout data.dvc" in text and not pipeline.is_transient(caught.value)


def test_retrain_flow_checks_data_before_any_repro(tmp_path, monkeypatch, prefect_api):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import pipeline

    versioned_raw(tmp_path)
    (tmp_path / "data/raw/a.txt").write_text("edited")
    monkeypatch.chdir(tmp_path)
    called = []
    monkeypatch.setattr(pipeline, "run_dvc", lambda *a: called.append(a))
    with (
        temporary_settings({PREFECT_API_URL: prefect_api}),
        pytest.raises(pipeline.DataChanged, match="changed: a.txt"),
    ):
        pipeline.retrain_and_promote_flow()
    assert called == []


def test_pipeline_flow_gives_its_stages_one_mlflow_parent(monkeypatch, prefect_api):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import pipeline
    from genpipe.tracking import parent

    seen = []
    monkeypatch.delenv(parent.PIPELINE_ENV, raising=False)
    monkeypatch.setattr(pipeline, "stage_order", lambda: ["prepare", "judges"])
    monkeypatch.setattr(  # what each `dvc repro` (and so each stage process) inherits
        pipeline, "run_dvc", lambda *args: seen.append(os.environ.get(parent.PIPELINE_ENV)) or ""
    )
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        state = pipeline.pipeline_flow(return_state=True)
    assert state.is_completed() and len(seen) == 2 and seen[0] == seen[1]
    flow_run = str(state.state_details.flow_run_id)
    group = json.loads(seen[0])
    assert (
        group["key"] == f"prefect:{flow_run}" and group["tags"]["prefect.flow_run_id"] == flow_run
    )
    assert parent.PIPELINE_ENV not in os.environ  # set for the flow's stages only


# -- 7. an unreachable tracking server fails the stage at once --


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage_fails_fast_naming_the_redacted_uri(workdir, prefect_api):
    port = closed_port()
    uri = f"http://alice:s3cret@127.0.0.1:{port}"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.stage", "prepare"],
        cwd=workdir,
        env=child_env(MLFLOW_TRACKING_URI=uri, PREFECT_API_URL=prefect_api),
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"http://***@127.0.0.1:{port}" in proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr
    assert elapsed < 15, elapsed
    assert not (workdir / "data/prepared").exists()


def test_reachability_check_is_one_bounded_try_and_not_retried(monkeypatch):
    from flows.stage import is_transient

    tries = []

    def silent(address, timeout):
        tries.append((address, timeout))
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    with pytest.raises(store.TrackingUnreachable, match=r"https://\*\*\*@mlflow cannot") as caught:
        store.check_reachable("https://u:p@mlflow")
    assert tries == [(("mlflow", 443), store.REACH_TIMEOUT_S)] and store.REACH_TIMEOUT_S <= 5
    assert not is_transient(caught.value)


# -- 8. credentials never shown --


@pytest.mark.parametrize(
    ("shown", "redacted"),
    [
        ("http://user:pass@host:5000/api", "http://***@host:5000/api"),
        ("https://token@host", "https://***@host"),
        (
            "MLflow: `postgresql+psycopg2://u:p@db/ml` x",
            "MLflow: `postgresql+psycopg2://***@db/ml` x",
        ),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("mail me at a@b.c", "mail me at a@b.c"),
    ],
)
def test_redact(shown, redacted):
    assert store.redact(shown) == redacted


def test_prefect_summary_shows_the_uri_redacted():
    from flows.pipeline import summary_markdown

    text = summary_markdown([], None, None, "http://user:pass@mlflow:5000")
    assert "http://***@mlflow:5000" in text and "pass" not in text


def test_prefect_failure_logs_and_states_show_the_uri_redacted(prefect_api, monkeypatch):
    import logging

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import stage

    uri = "http://alice:s3cret@mlflow:5000"  # not on a line the traceback quotes

    def failing(name, params):
        try:
            raise OSError(f"token rejected by {uri}")
        except OSError as inner:
            raise RuntimeError(f"API request to {uri}/api failed") from inner

    monkeypatch.setattr(stage, "load_params", lambda path: None)
    monkeypatch.setattr(stage, "run_stage", failing)
    flow = stage.stage_flow("prepare")  # imports Prefect, whose logging set-up drops handlers
    formatter = logging.Formatter("%(name)s %(message)s")
    lines: list[str] = []
    seen = logging.Handler()
    seen.emit = lambda record: lines.append(formatter.format(record))  # type: ignore[method-assign]
    logging.getLogger("prefect").addHandler(seen)  # Prefect's console and API handlers see these
    try:
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            state = flow(return_state=True)
    finally:
        logging.getLogger("prefect").removeHandler(seen)
    text = "\n".join(lines)
    assert state.is_failed() and "Traceback" in text and "prefect.task_runs" in text
    assert "s3cret" not in text and "s3cret" not in state.message
    assert "http://***@mlflow:5000/api failed" in text and "http://***@mlflow:5000" in state.message
    assert "token rejected by http://***@mlflow:5000" in text  # the chained cause too


# -- 9. CLI and deployment bits --


def test_version(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["--version"])
    assert caught.value.code == 0 and capsys.readouterr().out.startswith("genpipe ")


def test_cuda_without_gpu_names_the_key(workdir, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["base"]["device"] = "cuda"
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli.main(["stage", "tokenize"]) == 2
    err = capsys.readouterr().err
    assert "base.device" in err and "Traceback" not in err


def test_deployment_runs_one_at_a_time_with_a_timeout(monkeypatch):
    from flows import deploy, pipeline

    seen = {}
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    monkeypatch.setattr(
        type(deploy.retrain_and_promote_flow), "serve", lambda self, **kw: seen.update(kw)
    )
    deploy.main([])
    assert seen["global_limit"] == 1 and seen["limit"] == 1
    assert pipeline.retrain_and_promote_flow.timeout_seconds == pipeline.TIMEOUT_S
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
    assert spec["concurrency_limit"]["limit"] == 1


def test_uncaught_error_traceback_is_redacted():
    script = (
        "from genpipe.tracking.store import redact_tracebacks; redact_tracebacks(); "
        "raise RuntimeError('request to http://alice:s3cret@mlflow:5000/api failed')"
    )
    proc = subprocess.run([*PYTHON, script], env=child_env(), capture_output=True, text=True)
    assert proc.returncode == 1
    assert "http://***@mlflow:5000/api" in proc.stderr and "s3cret" not in proc.stderr
