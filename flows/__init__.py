"""Prefect flows: `stage` (one pipeline stage, run by dvc.yaml), `pipeline` (the DAG and the
nightly retrain-and-promote) and `deploy` (serving that schedule)."""

import os

# Local-only defaults; any of them can be overridden from the environment. Run logs stay at
# INFO: the pipeline logs each stage's output lines there, for the terminal and the UI.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
