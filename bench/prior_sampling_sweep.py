"""The `evaluate` stage's sample metrics of one trained prior under other sampler settings,
without retraining: to choose a kind's guidance scale, guidance interval or decoding steps.

    python bench/prior_sampling_sweep.py [--root .] [--prior models/prior] \
        '{"cfg_scale": 1.25}' '{"cfg_scale": 2.0, "guidance_interval": [0.0, 0.6]}' ...

Each argument is a JSON object of overrides of the sampling settings recorded in the prior
file (`{}` = as recorded). Same samples, seed and metrics as `evaluate` (its params.yaml
section), so the recorded setting reproduces evaluate's figures for that prior.

`--record FILE` appends each result (kind, sampling, every metric with its interval, the seed,
the commit, and the prior stage's metrics from `--prior-metrics`, e.g. its training steps) to
a JSON list: docs/results/<preset>/prior_kinds.json is what `bench/reference_runs.py --render`
tables as "Prior kinds".

`--resamples N` sets the bootstrap resamples behind each interval (default 1,000, as
`evaluate`; recorded as null); the point estimates do not depend on it.

`--grids DIR` saves each setting's sample grid (evaluate's: the first 10 of each class, a row
per class) as DIR/<n>.png, n the setting's position among the arguments, to look at.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from genpipe import artifacts, evaluation, viz
from genpipe.artifacts.generator import load_generator
from genpipe.artifacts.judges import load_judge
from genpipe.config import load_params
from genpipe.data.prepared import load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--prior", type=Path, default=artifacts.PRIOR, help="folder, from root")
    parser.add_argument("--record", type=Path, help="append the results to this JSON list")
    parser.add_argument("--prior-metrics", type=Path, help="the prior stage's metrics, recorded")
    parser.add_argument("--grids", type=Path, help="save each setting's sample grid here")
    parser.add_argument(
        "--resamples",
        type=int,
        help="bootstrap resamples per interval (default: evaluate's 1,000); fewer make 500 "
        "samples per class take minutes, not an hour, with rougher intervals",
    )
    parser.add_argument("overrides", nargs="+", type=json.loads)
    args = parser.parse_args()
    root = args.root
    params = load_params(root / "params.yaml")
    cfg, seed = params.evaluate, params.base.seed
    test_x, _ = load_split("test", root / artifacts.PREPARED)
    val_x, val_y = load_split("val", root / artifacts.PREPARED)
    num_classes = int(val_y.max()) + 1
    evaluator = load_judge(root, "evaluator", num_classes)
    floor_x, _ = evaluation.floor_sample(val_x, val_y, cfg.samples_per_class, seed)  # as evaluate
    gen = load_generator(root / artifacts.TOKENIZER_FILE, root / args.prior / artifacts.PRIOR_FILE)
    recorded = dict(gen.sampling)
    print(f"{gen.kind} prior; recorded sampling {recorded}")
    for n, override in enumerate(args.overrides):
        gen.sampling = {**recorded, **override}
        t0 = time.perf_counter()
        with torch.no_grad():
            m, images = evaluation.score(
                gen, evaluator, test_x, floor_x, cfg, num_classes, seed, args.resamples
            )
        print(
            f"{json.dumps(override)}: FID ratio {m['fid_ratio']:.2f}, precision "
            f"{m['precision']:.3f}, recall {m['recall']:.3f}, consistency "
            f"{m['class_consistency']:.3f} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        if args.grids:
            grid = viz.class_grid(images, cfg.samples_per_class, num_classes)
            viz.save_png(grid, args.grids / f"{n}.png")
        if args.record:
            record(args, gen.kind, gen.sampling, m, seed)


def record(args: argparse.Namespace, kind: str, sampling: dict, m: dict, seed: int) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    prior = json.loads(args.prior_metrics.read_text()) if args.prior_metrics else {}
    rows = json.loads(args.record.read_text()) if args.record.is_file() else []
    rows.append(
        {
            "kind": kind,
            "sampling": sampling,
            "seed": seed,
            "resamples": args.resamples,
            "commit": commit,
            "date": time.strftime("%Y-%m-%d"),
            "prior": prior,
            "metrics": {k: float(v) for k, v in m.items()},
        }
    )
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
