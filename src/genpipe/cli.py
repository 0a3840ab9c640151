"""`genpipe` command line: data export, stage runs without Prefect, dvc.yaml from the stage
specs, audits."""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from genpipe.config import ParamsError, load_params, parse_params
from genpipe.data.catalog import SOURCES
from genpipe.data.raw import DataError
from genpipe.locks import Busy
from genpipe.stages import STAGES
from genpipe.tracking.store import TrackingLost, TrackingUnreachable, redact, redact_tracebacks

# Bad input and refusals: a message naming the key, file or holder, exit 2, no traceback.
# (RewardError and ModelFileError are ValueErrors, as pydantic's own.)
REFUSALS = (ParamsError, DataError, ValueError, Busy, TrackingUnreachable, TrackingLost)


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from genpipe.data.raw import first_per_class, write_raw
    from genpipe.data.sources import load_source

    data = load_source(args.source, Path(args.path) if args.path else None)
    if args.per_class is not None:
        data = first_per_class(data, args.per_class)
    write_raw(data, Path(args.out))
    print(
        f"wrote {len(data.labels)} images in {len(data.classes)} classes "
        f"from {args.source} to {args.out}"
    )
    return 0


def cmd_data_ensure(args: argparse.Namespace) -> int:
    """Materialise data/raw as data.dvc records it: present, pulled, or exported from the
    bundled source; refuse (naming the fix) when what we can make does not match data.dvc."""
    import subprocess

    import yaml

    from genpipe.data.raw import write_raw
    from genpipe.data.sources import load_source
    from genpipe.lineage import dvc_md5

    raw = Path("data/raw")
    expected = yaml.safe_load(Path("data.dvc").read_text())["outs"][0]["md5"]
    if not raw.exists():
        pulled = subprocess.run(["dvc", "pull", "-q", "data.dvc"], capture_output=True)
        if pulled.returncode != 0:
            source = load_params(args.params).base.source
            if source != "digits":
                raise DataError(
                    f"data/raw is missing and `dvc pull data.dvc` failed; configure the DVC "
                    f"remote that holds it, or run `genpipe data fetch {source} --path ...`"
                )
            write_raw(load_source("digits"), raw)
    actual = dvc_md5(raw)
    if actual != expected:
        raise DataError(
            f"data/raw has md5 {actual} but data.dvc records {expected}: run `dvc checkout "
            "data.dvc` to restore it, or `dvc add data/raw` to version the new data"
        )
    subprocess.run(["dvc", "commit", "-q", "-f", "data.dvc"], check=True)
    print(f"data/raw matches data.dvc ({expected})")
    return 0


def cmd_preset(args: argparse.Namespace) -> int:
    """Switch params.yaml to a preset; without a name, say which one it follows and how far."""
    import yaml

    from genpipe import presets

    if args.check:
        for name in presets.available():
            presets.load(name)
        print(f"presets valid and complete: {', '.join(presets.available())}")
    if args.name is None:
        raw = yaml.safe_load(Path(args.params).read_text())
        name = load_params(args.params).base.preset
        changed = presets.diff(raw, presets.reference(raw))
        print(
            f"{args.params} follows preset {name!r}"
            + (f"; differs at: {', '.join(changed)}" if changed else ", unchanged")
        )
        return 0
    if args.name == "auto":
        if args.image_size is None:
            raise ParamsError("preset auto: needs --image-size N (pixels per side)")
        raw, note = presets.derive(args.image_size, args.channels, args.source)
        text = (
            "# Derived by `genpipe preset auto`: "
            + note
            + "\n"
            + yaml.safe_dump(raw, sort_keys=False)
        )
        params = parse_params(raw)
    else:
        text, params = presets.load(args.name)
        note = f"presets/{args.name}.yaml"
    Path(args.params).write_text(text)
    print(f"{args.params} <- {note}")
    _hint_data(params.base.source)
    return 0


def _hint_data(source: str) -> None:
    """Say when data/raw holds another source than the preset trains on (prepare would refuse
    or, worse, train on the wrong data)."""
    import json

    manifest = Path("data/raw/manifest.json")
    have = json.loads(manifest.read_text())["source"] if manifest.is_file() else None
    if have != source:
        print(
            f"note: base.source is {source} but data/raw holds {have or 'nothing'}: run "
            f"`genpipe data fetch {source} --path ...` and `dvc add data/raw` "
            "(README: Data)"
        )


def cmd_stage(args: argparse.Namespace) -> int:
    """Run one stage in-process, without Prefect (debugging, profiling); SIGTERM unwinds
    it as in flows/stage.py."""
    from genpipe.tracking.store import check_reachable

    params = load_params(args.params)
    check_reachable()  # before torch and the stage load: seconds on a busy machine

    from genpipe.runtime import stop_on_sigterm
    from genpipe.stages import run_stage

    stop_on_sigterm()
    run_stage(args.name, params)
    return 0


def cmd_dvc_yaml(args: argparse.Namespace) -> int:
    """Write dvc.yaml from the stage specs; --check exits 1 when it is out of date."""
    from genpipe import dvcyaml

    path = Path(args.path)
    if dvcyaml.write(path, check=args.check):
        print(f"{path} is up to date with the stage specs")
        return 0
    if args.check:
        print(f"{path} differs from the stage specs: run `genpipe dvc-yaml`", file=sys.stderr)
        return 1
    print(f"wrote {path} from the stage specs")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Exit 0 only when the model reproduces; 1 when something differs; 2 when unauditable."""
    from genpipe import audit
    from genpipe.tracking.write import log_report

    report = audit.audit(args.model, Path.cwd(), None if args.no_rerun else args.target)
    md, js = audit.write_reports(report, Path(args.out))
    log_report(
        "audit",
        [md, js],
        {"audit.model": f"{report.model}/{report.version}", "audit.verdict": report.verdict},
    )
    print(md.read_text())
    for item in report.failures:
        print(f"DIFFERS: {item.what}: {item.detail}", file=sys.stderr)
    return {"reproduces": 0, "differs": 1}.get(report.verdict, 2)


def version() -> str:
    try:
        return metadata.version("genpipe")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: `pip install -e .`)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, where it has one (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return str(super()._get_help_string(action))


def build_parser() -> argparse.ArgumentParser:
    """Every option has help, and `--help` shows its default (a test checks both)."""
    fmt = {"formatter_class": HelpFormatter}
    parser = argparse.ArgumentParser(prog="genpipe", description=__doc__, **fmt)
    parser.add_argument("--version", action="version", version=f"genpipe {version()}")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="`genpipe COMMAND --help`: its options",
    )

    data = sub.add_parser("data", help="dataset commands", **fmt).add_subparsers(
        dest="data_cmd", required=True, metavar="COMMAND", help="fetch or ensure"
    )
    fetch = data.add_parser(
        "fetch", help="export a source to data/raw in the canonical format", **fmt
    )
    fetch.add_argument("source", choices=list(SOURCES), help="where the images come from")
    fetch.add_argument(
        "--path", help="MNIST idx files, torchvision root (local copy / download) or image folder"
    )
    fetch.add_argument("--out", default="data/raw", help="folder to write")
    fetch.add_argument(
        "--per-class",
        type=int,
        metavar="N",
        help="keep only the first N images of each class in each split (smoke runs)",
    )
    fetch.set_defaults(func=cmd_data_fetch)

    ensure = data.add_parser(
        "ensure", help="make data/raw match data.dvc (keep, dvc pull, or export digits)", **fmt
    )
    ensure.add_argument("--params", default="params.yaml", help="params file (base.source)")
    ensure.set_defaults(func=cmd_data_ensure)

    preset = sub.add_parser(
        "preset", help="switch params.yaml to a preset (presets/<name>.yaml, or auto)", **fmt
    )
    preset.add_argument("name", nargs="?", help="a preset name, or auto; none: show the current")
    preset.add_argument("--image-size", type=int, help="auto: pixels per side")
    preset.add_argument(
        "--channels", type=int, default=1, choices=[1, 3], help="auto: image channels"
    )
    preset.add_argument(
        "--source",
        default="folder",
        choices=list(SOURCES),
        help="auto: base.source",
    )
    preset.add_argument("--check", action="store_true", help="validate every preset first")
    preset.add_argument("--params", default="params.yaml", help="params file to write or show")
    preset.set_defaults(func=cmd_preset)

    stage = sub.add_parser("stage", help="run one stage in-process, without Prefect", **fmt)
    stage.add_argument("name", choices=STAGES, help="the stage to run")
    stage.add_argument("--params", default="params.yaml", help="params file")
    stage.set_defaults(func=cmd_stage)
    dvc_yaml = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage specs", **fmt)
    dvc_yaml.add_argument("--check", action="store_true", help="exit 1 if it is out of date")
    dvc_yaml.add_argument("--path", default="dvc.yaml", help="file to write or check")
    dvc_yaml.set_defaults(func=cmd_dvc_yaml)

    aud = sub.add_parser(
        "audit", help="prove a registered model reproduces from its lineage", **fmt
    )
    aud.add_argument(
        "--model", default="genpipe-generator@champion", help="NAME@ALIAS or NAME/VERSION"
    )
    aud.add_argument("--out", default="reports/audit", help="folder for the .md/.json report")
    aud.add_argument("--target", default="evaluate", help="last DVC stage to re-run")
    aud.add_argument("--no-rerun", action="store_true", help="check lineage only, no re-run")
    aud.set_defaults(func=cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    redact_tracebacks()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except REFUSALS as exc:
        print(f"genpipe: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM, after the stage has unwound
        print(f"genpipe: stopped ({exc or 'interrupted'})", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
