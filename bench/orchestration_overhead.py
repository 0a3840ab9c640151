"""Orchestration overhead of the whole DAG: what a stage costs beyond its work.

In a scratch clone of a commit (default: this repo's HEAD), runs the whole pipeline three
ways, interleaved in rounds so a shared machine's load falls on all of them alike:

  work        every stage's `run` in one warm process (imports, MLflow store paid up front):
              the stages' own work, MLflow logging included;
  make repro  `python -m flows.pipeline` (what `make repro` runs after `data ensure`);
  dvc repro   a plain `dvc repro --force` without PREFECT_API_URL.

CPU seconds are those of the whole process tree, counting what a plain `dvc repro` leaves
running apart from it: the shared Prefect server and the checkout's warm process (with the
stage processes it forked).

Before each run dvc.lock and DVC's run cache are removed, so every stage runs. Prints a
table per stage (seconds; medians over rounds) and the bars: overhead = (make repro - work)
/ make repro, and dvc repro / make repro.

    .venv/bin/python bench/orchestration_overhead.py [--source DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EMPTY_STORE = "mlflow-empty.db"  # beside the clone: an MLflow store with its schema, no runs
RUNNING = re.compile(r"Running stage '([\w-]+)'")
ROW = re.compile(r"^(\w+)\s+(ran|up to date|restored from run cache)\s+([\d.]+) s$")


def work_only() -> None:
    """In the clone: time each stage's `run` in one process, imports and store set-up paid
    before the clock starts; prints `stage seconds` lines."""
    from genpipe.config import load_params
    from genpipe.stages import STAGES, load, run_stage
    from genpipe.tracking.store import check_reachable

    params = load_params()
    check_reachable()
    for name in STAGES:
        load(name)
    import mlflow

    mlflow.search_experiments()  # the store's schema migrations, done once
    for name in STAGES:
        start = time.perf_counter()
        run_stage(name, params)
        print(f"{name} {time.perf_counter() - start:.2f}", flush=True)


def reset(root: Path) -> None:
    """Make every stage stale and uncached, so each variant runs the whole DAG, and empty the
    MLflow store, so each starts with no champion: otherwise `register` after the first
    variant also scores the previous champion (~9 s on digits), work no variant's
    orchestration adds. The empty store is a copy of one made at set-up (`clone`), its
    schema in place, as `work` has it before its clock starts."""
    (root / "dvc.lock").unlink(missing_ok=True)
    shutil.rmtree(root / ".dvc" / "cache" / "runs", ignore_errors=True)
    shutil.copyfile(root.parent / EMPTY_STORE, root / "mlflow.db")
    shutil.rmtree(root / "mlartifacts", ignore_errors=True)


def cpu_s() -> float:
    """User + system seconds of every waited-for descendant so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


Timed = tuple[float, float, list[tuple[float, str]]]


def timed(cmd: list[str], root: Path, env: dict[str, str]) -> Timed:
    """Wall and CPU seconds of `cmd`, and its output lines with the second each arrived."""
    start, cpu = time.perf_counter(), cpu_s()
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
    if proc.wait() != 0:
        tail = "\n".join(text for _, text in lines[-40:])
        raise SystemExit(f"{' '.join(cmd)} failed:\n{tail}")
    return time.perf_counter() - start, cpu_s() - cpu, lines


def run_work(root: Path, env: dict[str, str]) -> tuple[float, float, dict[str, float]]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--work-only"]
    wall, cpu, lines = timed(cmd, root, env)
    found = (text.split() for _, text in lines)
    return wall, cpu, {p[0]: float(p[1]) for p in found if len(p) == 2 and _num(p[1])}


def run_pipeline(root: Path, env: dict[str, str]) -> tuple[float, float, dict[str, float]]:
    wall, cpu, lines = timed([sys.executable, "-m", "flows.pipeline"], root, env)
    rows = (ROW.match(text) for _, text in lines)
    return wall, cpu, {m[1]: float(m[3]) for m in rows if m}


def tree_cpu_s(pid: int) -> float:
    """User + system seconds of a live process and its descendants, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    own = sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return own + sum(tree_cpu_s(int(kid)) for kid in kids)


def shared_server_cpu_s(env: dict[str, str]) -> float:
    """CPU of the shared Prefect server a plain `dvc repro` left running (not our child)."""
    info = Path(env["PREFECT_HOME"]) / "genpipe-shared" / "server.json"
    return tree_cpu_s(json.loads(info.read_text())["pid"]) if info.is_file() else 0.0


def warm_process_cpu_s(root: Path) -> float:
    """CPU of the warm process a plain `dvc repro` of `root` started (flows.warm_shared; not
    our child), with the stage processes it forked and reaped; then stop it, so each run
    pays for its own start."""
    total = 0.0
    for state in Path(f"/tmp/genpipe-warm-{os.getuid()}").glob("*.json"):
        try:
            found = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        if found.get("root") == os.path.realpath(root):
            total += tree_cpu_s(found["pid"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(found["pid"], signal.SIGTERM)
    return total


def run_dvc(root: Path, env: dict[str, str]) -> tuple[float, float, dict[str, float]]:
    wall, cpu, lines = timed(["dvc", "repro", "--force"], root, env)
    cpu += shared_server_cpu_s(env) + warm_process_cpu_s(root)
    starts = [(t, m[1]) for t, text in lines if (m := RUNNING.search(text))]
    ends = [t for t, _ in starts[1:]] + [wall]
    return wall, cpu, {name: end - t for (t, name), end in zip(starts, ends, strict=True)}


def _num(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def clone(source: Path, tmp: Path) -> tuple[Path, dict[str, str]]:
    root = tmp / "repo"
    subprocess.run(["git", "clone", "-q", str(source), str(root)], check=True)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PREFECT_HOME": str(tmp / "prefect"),
    }
    env.pop("PREFECT_API_URL", None)
    # a commit whose stages start temporary servers: give them time on a loaded machine
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    subprocess.run(
        [sys.executable, "-m", "genpipe.cli", "data", "ensure"],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
    )
    # What a user's machine has after its first run, and `work` before its clock: a Prefect
    # database (with the UI's files) and an MLflow store's schema. Made fresh inside a
    # variant, they cost it 3-5 s and ~5 s of wall (measured), once per PREFECT_HOME and
    # per store, and Prefect's only to whichever variant started a server first.
    prepared = [
        "import mlflow",
        f"mlflow.set_tracking_uri('sqlite:///{tmp / EMPTY_STORE}')",
        "mlflow.search_experiments()",
        "from genpipe.prefect_server import local_server",
        "with local_server(): pass",
    ]
    subprocess.run(
        [sys.executable, "-c", "\n".join(prepared)],
        env={**env, "PYTHONPATH": str(REPO / "src")},  # this bench's server code
        check=True,
        capture_output=True,
    )
    return root, env


VARIANTS = {"work": run_work, "make repro": run_pipeline, "dvc repro": run_dvc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=REPO, help="git repo to clone (HEAD)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--work-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.work_only:
        return work_only()
    runs: dict[str, list[tuple[float, float, dict[str, float]]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="genpipe-overhead-") as tmp:
        root, env = clone(args.source.resolve(), Path(tmp))
        names = list(VARIANTS)
        for i in range(args.rounds):
            for name in names[i % 3 :] + names[: i % 3]:
                reset(root)
                runs[name].append(VARIANTS[name](root, env))
                wall, cpu, stages = runs[name][-1]
                shown = " ".join(f"{k}={v:.1f}" for k, v in stages.items())
                print(f"round {i + 1}: {name} {wall:.1f} s, {cpu:.1f} CPU s; {shown}", flush=True)
    report(runs)


def report(runs: dict[str, list[tuple[float, float, dict[str, float]]]]) -> None:
    def med(name: str, stage: str) -> float:
        return statistics.median(r[2].get(stage, float("nan")) for r in runs[name])

    def total(name: str, which: int) -> float:
        return float(statistics.median(r[which] for r in runs[name]))

    stages = list(runs["work"][0][2])
    print(f"{'stage':<10}{'work s':>8}{'make repro s':>14}{'dvc repro s':>13}{'overhead s':>12}")
    for stage in stages:
        work, piped, dvc = med("work", stage), med("make repro", stage), med("dvc repro", stage)
        print(f"{stage:<10}{work:>8.1f}{piped:>14.1f}{dvc:>13.1f}{piped - work:>12.1f}")
    work = sum(med("work", s) for s in stages)
    piped, dvc = total("make repro", 0), total("dvc repro", 0)
    print(f"{'whole':<10}{work:>8.1f}{piped:>14.1f}{dvc:>13.1f}{piped - work:>12.1f}")
    cpu = {name: total(name, 1) for name in runs}
    print("CPU s (whole process tree): " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    print(
        f"overhead: {100 * (piped - work) / piped:.0f}% of make repro's pipeline wall (bar 20%), "
        f"{100 * (cpu['make repro'] - cpu['work']) / cpu['make repro']:.0f}% of its CPU; "
        f"dvc repro --force / make repro = {dvc / piped:.2f} wall (bar 1.15), "
        f"{cpu['dvc repro'] / cpu['make repro']:.2f} CPU"
    )


if __name__ == "__main__":
    main()
