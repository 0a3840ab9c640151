"""Reference runs: the whole pipeline per preset in a scratch clone, published in docs/results.md.

For each preset: clone the committed tree, switch to the preset (`genpipe preset NAME`), bring
its data (`genpipe data ensure` for digits, `genpipe data fetch mnist --path ...` + `dvc add`
for MNIST), then run every stage with `dvc repro --single-item` against one Prefect server,
timing each stage and reading its peak RSS (the largest process under it). The figures, the
sample and reconstruction grids and the machine go to docs/results/<preset>/, and
docs/results.md is rendered from every preset's results.json found there, followed by the
findings of other benchmarks in docs/findings/*.md.

    .venv/bin/python bench/reference_runs.py --preset digits
    .venv/bin/python bench/reference_runs.py --preset mnist --mnist ../shared/datasets/mnist
    .venv/bin/python bench/reference_runs.py --render      # docs/results.md from results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
BIN = Path(sys.executable).parent
PICTURES = {
    "recon_test.png": "plots/tokenizer/recon_test.png",
    "samples_prior.png": "plots/prior/samples.png",
    "samples_base.png": "plots/evaluate/samples_base.png",
    "samples_finetuned.png": "plots/evaluate/samples_finetuned.png",
}


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def timed_stage(stage: str, cwd: Path, env: dict[str, str]) -> dict[str, float]:
    """Wall seconds and peak RSS (GiB) of one `dvc repro --single-item`, measured in a fresh
    wrapper process so RUSAGE_CHILDREN covers this stage alone."""
    probe = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(f'{time.perf_counter() - t} {peak} {rc}')\n"
    )
    cmd = [sys.executable, "-c", probe, "dvc", "repro", "--single-item", stage]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall, peak_kib, rc = proc.stdout.strip().splitlines()[-1].split()
    if int(rc) != 0:
        raise SystemExit(f"stage {stage} failed:\n{proc.stderr[-4000:]}")
    return {"wall_s": round(float(wall), 1), "peak_rss_gib": round(int(peak_kib) / 2**20, 2)}


def machine() -> dict[str, Any]:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def read(root: Path, stage: str) -> dict[str, Any]:
    path = root / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_preset(preset: str, mnist: Path | None) -> dict[str, Any]:
    from genpipe.prefect_server import local_server
    from genpipe.stages import STAGES

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix=f"genpipe-ref-{preset}-") as tmp:
        root = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
        env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "PREFECT_HOME": str(Path(tmp) / "prefect"),
            "GIT_AUTHOR_NAME": "genpipe",
            "GIT_AUTHOR_EMAIL": "bench@genpipe",
            "GIT_COMMITTER_NAME": "genpipe",
            "GIT_COMMITTER_EMAIL": "bench@genpipe",
        }
        env.pop("PYTHONPATH", None)
        sh(["genpipe", "preset", preset], root, env)
        if preset == "mnist":
            if mnist is None:
                raise SystemExit("--preset mnist needs --mnist DIR (the four MNIST idx files)")
            sh(["genpipe", "data", "fetch", "mnist", "--path", str(mnist.resolve())], root, env)
            sh(["dvc", "add", "-q", "data/raw"], root, env)
        else:
            sh(["genpipe", "data", "ensure"], root, env)
        sh(["git", "commit", "-qam", f"reference run: preset {preset}", "--allow-empty"], root, env)
        stages: dict[str, dict[str, float]] = {}
        os.environ["PREFECT_HOME"] = env["PREFECT_HOME"]
        with local_server() as url:
            env["PREFECT_API_URL"] = url
            for stage in STAGES:
                print(f"[{preset}] {stage} ...", file=sys.stderr, flush=True)
                stages[stage] = timed_stage(stage, root, env)
                print(f"[{preset}] {stage}: {stages[stage]}", file=sys.stderr, flush=True)
        out = DOCS / "results" / preset
        out.mkdir(parents=True, exist_ok=True)
        for name, src in PICTURES.items():
            if (root / src).is_file():
                shutil.copyfile(root / src, out / name)
        result = {
            "preset": preset,
            "commit": commit,
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "stages": stages,
            "metrics": {s: read(root, s) for s in STAGES},
            "decision": next(
                (json.loads(p.read_text()) for p in root.glob("reports/register/decision.json")),
                {},
            ),
        }
    (out / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def _f(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "n/a"


def _ci(m: dict[str, Any], key: str) -> str:
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return f"{_f(m.get(key))} [{_f(lo)}, {_f(hi)}]" if lo is not None else _f(m.get(key))


def section(r: dict[str, Any]) -> str:
    m, mach = r["metrics"], r["machine"]
    tok = m["tokenizer"].get("test", {})
    pre, judges, prior = m["pretrain"], m["judges"], m["prior"]
    lines = [
        f"## Preset `{r['preset']}`",
        "",
        f"Commit `{r['commit']}`, {r['date']}; {mach['cores']} cores ({mach['cpu']}), "
        f"{mach['memory_gib']} GiB, GPU: {mach['gpu']}; torch {mach['torch']}.",
        "",
        "| stage | figure | value |",
        "|---|---|---|",
        f"| tokenizer | test PSNR (dB) | {_f(tok.get('psnr'), 2)} |",
        f"| tokenizer | codebook usage | {_f(tok.get('codebook_usage'))} |",
        f"| pretrain | SSL linear probe | {_f(pre.get('ssl', {}).get('linear_probe'))} |",
        f"| pretrain | raw-pixel linear probe | {_f(pre.get('pixels', {}).get('linear_probe'))} |",
        f"| judges | reward test accuracy | {_f(judges.get('reward', {}).get('test_accuracy'))} |",
        f"| judges | evaluator test accuracy "
        f"| {_f(judges.get('evaluator', {}).get('test_accuracy'))} |",
        f"| prior ({prior.get('kind', '?')}) | class consistency (stage check) "
        f"| {_f(prior.get('class_consistency'))} |",
    ]
    for which in ("base", "finetuned"):
        e = m["evaluate"].get(which, {})
        for key in ("fid_ratio", "precision", "recall", "class_consistency"):
            lines.append(f"| evaluate ({which}) | {key} [95% interval] | {_ci(e, key)} |")
    decision = r.get("decision", {})
    if decision:
        lines.append(f"| register | promoted | {decision.get('promote', 'n/a')} |")
    lines += ["", "| stage | wall (s) | peak RSS (GiB) |", "|---|---|---|"]
    from genpipe.stages import STAGES

    for stage in STAGES:
        t = r["stages"][stage]
        lines.append(f"| {stage} | {t['wall_s']} | {t['peak_rss_gib']} |")
    total = sum(t["wall_s"] for t in r["stages"].values())
    peak = max(t["peak_rss_gib"] for t in r["stages"].values())
    lines += [f"| **whole DAG** | {total:.0f} | {peak} |", ""]
    pictures = DOCS / "results" / r["preset"]
    for name in PICTURES:
        if (pictures / name).is_file():
            lines.append(f"![{r['preset']} {name}](results/{r['preset']}/{name})")
    return "\n".join(lines) + "\n"


def prior_kinds(preset: str) -> str:
    """The "Prior kinds" table of a preset: every base prior scored by
    `bench/prior_sampling_sweep.py --record docs/results/<preset>/prior_kinds.json` on the same
    tokenizer, codes and evaluator (evaluate's samples and seed), one row per record."""
    path = DOCS / "results" / preset / "prior_kinds.json"
    if not path.is_file():
        return ""
    rows = json.loads(path.read_text())
    lines = [
        f"### Prior kinds (`{preset}`)",
        "",
        "Base priors (no RL), each trained by the `prior` stage with the preset's params and",
        "`prior.kind` changed, scored like `evaluate` (95% intervals in brackets).",
        "",
        "| kind | train steps | sampling | FID ratio | precision | recall | consistency "
        "| seed | commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, s = r["metrics"], r["sampling"]
        shown = {k: s[k] for k in ("cfg_scale", "guidance_interval", "steps", "top_p") if k in s}
        sampling = ", ".join(f"{k} {v}" for k, v in shown.items())
        lines.append(
            f"| {r['kind']} | {r['prior'].get('train_steps', 'n/a')} | {sampling} "
            f"| {_ci(m, 'fid_ratio')} | {_ci(m, 'precision')} | {_ci(m, 'recall')} "
            f"| {_ci(m, 'class_consistency')} | {r['seed']} | `{r['commit']}` |"
        )
    return "\n".join(lines) + "\n"


def render() -> None:
    results = sorted(
        (json.loads(p.read_text()) for p in (DOCS / "results").glob("*/results.json")),
        key=lambda r: r["preset"],
    )
    head = (
        "# Reference results\n\n"
        "Written by `bench/reference_runs.py` (do not edit by hand): the whole pipeline per\n"
        "preset in a scratch clone, every stage timed with its peak RSS, on the machine named.\n"
        "Intervals are 95% bootstrap intervals over the generated samples (see\n"
        "`src/genpipe/evaluation_intervals.py`).\n\n"
    )
    # findings of other benchmarks (docs/findings/*.md), kept across re-renders
    findings = [p.read_text() for p in sorted((DOCS / "findings").glob("*.md"))]
    body = "\n".join(
        "\n".join(filter(None, (section(r), prior_kinds(r["preset"])))) for r in results
    )
    (DOCS / "results.md").write_text(head + "\n".join([body, *findings]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", default=[], help="preset to run (repeat)")
    parser.add_argument("--mnist", type=Path, help="folder with the four MNIST idx files")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/results.md")
    args = parser.parse_args()
    for preset in args.preset:
        result = run_preset(preset, args.mnist)
        total = sum(t["wall_s"] for t in result["stages"].values())
        print(f"{preset}: whole DAG {total:.0f} s", flush=True)
    render()
    print(f"wrote {DOCS / 'results.md'}")


if __name__ == "__main__":
    main()
