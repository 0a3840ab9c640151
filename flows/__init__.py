"""Prefect flows: one per pipeline stage (run by dvc.yaml) plus the pipeline flow."""

import os

# Quiet, local-only defaults; any of them can be overridden from the environment.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
