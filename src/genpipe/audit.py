"""Reproducibility audit of a registered model.

1. Walk the lineage: the run that logged the model version, then every upstream stage run
   (their `upstream.*` tags), collecting commit, dirty flag, params, input md5s, versions.
2. Check each is recoverable: the commit exists, params.yaml at that commit gives the logged
   params, data.dvc at that commit records the data md5 the pipeline read, the data is in
   the DVC cache, and the installed packages are the logged ones.
3. Re-run the pipeline at that commit in a temporary clone on the same data (DVC cache
   shared for reading; the run cache neither read nor written, nothing committed to the
   cache: its entries would name runs in the audit's throwaway store), then compare
   every recorded output file byte for byte (md5) and every metric.

The verdict is `reproduces`, `differs` (items named) or `unauditable` (e.g. a dirty tree).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from genpipe import lineage
from genpipe.config import parse_params
from genpipe.outputs import write_json
from genpipe.prefect_server import local_server
from genpipe.tracking.read import resolve_model, run_record
from genpipe.tracking.store import flatten


@dataclass
class Item:
    what: str
    ok: bool
    detail: str


@dataclass
class Report:
    model: str
    version: str
    verdict: str = "reproduces"
    commit: str = ""
    runs: dict[str, str] = field(default_factory=dict)
    items: list[Item] = field(default_factory=list)

    def check(self, what: str, ok: bool, detail: str) -> bool:
        self.items.append(Item(what, ok, detail))
        if not ok and self.verdict == "reproduces":
            self.verdict = "differs"
        return ok

    @property
    def failures(self) -> list[Item]:
        return [i for i in self.items if not i.ok]


def walk(run_id: str) -> dict[str, dict[str, Any]]:
    """Every run upstream of `run_id` (inclusive), keyed by stage."""
    runs: dict[str, dict[str, Any]] = {}
    todo = [run_id]
    while todo:
        record = run_record(todo.pop())
        stage = record["tags"].get("dvc.stage", record["run_id"])
        if stage in runs:
            continue
        runs[stage] = record
        todo += [v for k, v in record["tags"].items() if k.startswith("upstream.")]
    return runs


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def _flat_params(meta: dict[str, Any]) -> dict[str, Any]:
    return flatten(meta.get("params", {}))


def check_lineage(report: Report, runs: dict[str, dict[str, Any]], root: Path) -> None:
    for stage, rec in sorted(runs.items()):
        tags, meta = rec["tags"], rec.get("meta") or {}
        report.runs[stage] = rec["run_id"]
        if tags.get("git.dirty") == "True":
            report.check(f"{stage}: code", False, f"run {rec['run_id']} ran from a dirty tree")
            report.verdict = "unauditable"
            continue
        commit = tags.get("git.commit", "unknown")
        if not report.check(
            f"{stage}: commit",
            _git(root, "cat-file", "-e", f"{commit}^{{commit}}").returncode == 0,
            f"{commit} {'found' if commit != 'unknown' else 'not recorded'}",
        ):
            continue
        if not meta:
            report.check(f"{stage}: lineage", False, "run has no lineage/meta.json artifact")
            continue
        shown = _git(root, "show", f"{commit}:params.yaml")
        at_commit = (
            flatten(parse_params(yaml.safe_load(shown.stdout)).pick(*meta.get("params", {})))
            if shown.returncode == 0
            else {}
        )
        recorded = _flat_params(meta)
        diffs = [
            f"{k}: ran with {recorded[k]!r}, commit has {at_commit.get(k)!r}"
            for k in sorted(recorded)
            if at_commit.get(k) != recorded[k]
        ]
        report.check(
            f"{stage}: params", not diffs, "; ".join(diffs) or "match params.yaml at commit"
        )
        if "data/raw" in meta.get("deps", {}):
            _check_data(report, stage, meta["deps"]["data/raw"], commit, root)
        now = lineage.versions()
        drift = [
            f"{k} {v} (now {now.get(k)})"
            for k, v in meta.get("versions", {}).items()
            if now.get(k) != v
        ]
        report.check(
            f"{stage}: environment", not drift, "; ".join(drift) or "same package versions"
        )


def _check_data(report: Report, stage: str, used: str, commit: str, root: Path) -> None:
    shown = _git(root, "show", f"{commit}:data.dvc")
    versioned = yaml.safe_load(shown.stdout)["outs"][0]["md5"] if shown.returncode == 0 else None
    report.check(
        "data/raw: version",
        used == versioned,
        f"{stage} read md5 {used}; data.dvc at commit records {versioned}"
        + ("" if used == versioned else " (data changed outside DVC)"),
    )
    cached = (root / ".dvc/cache/files/md5" / used[:2] / used[2:]).is_file()
    report.check(
        "data/raw: recoverable",
        cached,
        f"{used} {'in' if cached else 'missing from'} the DVC cache",
    )


def rerun_steps(root: Path, target: str) -> list[list[str]]:
    """The commands run in the clone: share the project's cache for the data, re-run every
    stage up to `target` without touching its run cache (`--no-run-cache` skips restoring;
    `--no-commit` skips saving run-cache entries and the outputs)."""
    return [
        ["dvc", "cache", "dir", str(root / ".dvc/cache")],
        ["dvc", "checkout", "-q", "data.dvc"],
        ["dvc", "repro", "--force", "--no-run-cache", "--no-commit", target],
    ]


def rerun(report: Report, runs: dict[str, dict[str, Any]], root: Path, target: str) -> None:
    """Re-run the DAG up to `target` at the recorded commit; compare outputs and metrics."""
    with tempfile.TemporaryDirectory(prefix="genpipe-audit-") as tmp:
        clone = Path(tmp) / "repo"
        for cmd in (
            ["git", "clone", "-q", str(root), str(clone)],
            ["git", "-C", str(clone), "checkout", "-q", report.commit],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
        # the clone's own code (not this checkout's editable install) and a scratch store
        env = {
            **os.environ,
            "PYTHONPATH": str(clone / "src"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'audit.db'}",
        }
        with local_server() as api_url:  # one Prefect server for every stage, not one each
            env["PREFECT_API_URL"] = api_url
            for cmd in rerun_steps(root, target):
                proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    failed = f"`{' '.join(cmd)}` failed: {proc.stderr[-2000:]}"
                    report.check("re-run", False, failed)
                    return
        report.check("re-run", True, f"dvc repro --force {target} at {report.commit[:12]}")
        model_run = next(iter(runs))  # its outputs name the registry version: not re-made
        for stage, rec in sorted(runs.items()):
            if stage == model_run:
                continue
            recorded = rec.get("outputs") or {}
            for rel, md5 in sorted(recorded.items()):
                path = clone / rel
                again = lineage.file_md5(path) if path.is_file() else "missing"
                report.check(f"{stage}: {rel}", again == md5, f"recorded {md5}, re-run {again}")
            _compare_metrics(report, stage, rec, clone)
        shutil.rmtree(clone / ".dvc/tmp", ignore_errors=True)


def _compare_metrics(report: Report, stage: str, rec: dict[str, Any], clone: Path) -> None:
    path = clone / "metrics" / f"{stage}.json"
    if not path.is_file():
        return
    again = flatten(json.loads(path.read_text()))
    logged = {k: v for k, v in rec["metrics"].items() if k in again}
    diffs = [
        f"{k}: {v} vs {again[k]}"
        for k, v in logged.items()
        if abs(float(again[k]) - v) > 1e-9 * max(1, abs(v))
    ]
    report.check(f"{stage}: metrics", not diffs, "; ".join(diffs) or f"{len(logged)} metrics equal")


def audit(model: str, root: Path, rerun_target: str | None = "evaluate") -> Report:
    name, version, run_id = resolve_model(model)
    report = Report(name, version)
    runs = walk(run_id)  # the model's own run first
    report.commit = next(iter(runs.values()))["tags"].get("git.commit", "unknown")
    report.check("lineage", len(runs) > 1, f"{len(runs)} runs: {', '.join(sorted(runs))}")
    check_lineage(report, runs, root)
    if report.verdict != "unauditable" and rerun_target:
        rerun(report, runs, root, rerun_target)
    return report


def write_reports(report: Report, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report.model}-v{report.version}"
    json_path = out_dir / f"{stem}.json"
    write_json(json_path, {**asdict(report), "failures": [asdict(i) for i in report.failures]})
    lines = [
        f"# Audit of {report.model} version {report.version}",
        "",
        f"**Verdict: {report.verdict}** (commit `{report.commit}`)",
        "",
        "| check | ok | detail |",
        "|---|---|---|",
        *[f"| {i.what} | {'yes' if i.ok else '**NO**'} | {i.detail} |" for i in report.items],
    ]
    md_path = out_dir / f"{stem}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, json_path
