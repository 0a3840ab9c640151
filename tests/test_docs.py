"""The published results page is what its renderer makes of the committed results and findings:
a finding added to docs/findings/ without re-rendering would be missing from docs/results.md."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import reference_runs

REPO = Path(__file__).resolve().parents[1]


def test_results_page_is_rendered_from_results_and_findings(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs)
    (docs / "results.md").unlink()
    monkeypatch.setattr(reference_runs, "DOCS", docs)
    reference_runs.render()
    rendered = (docs / "results.md").read_text()
    if rendered != (REPO / "docs" / "results.md").read_text():
        pytest.fail(
            "docs/results.md is out of date with docs/findings/ or docs/results/*/results.json; "
            "run `python bench/reference_runs.py --render` and commit it"
        )
