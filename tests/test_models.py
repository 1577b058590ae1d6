"""Weights are local only: a missing folder or cache entry is a clear error, never a download."""

from __future__ import annotations

import pytest
from itemrt import WeightsNotFoundError
from itemrt.export.models import resolve


def test_missing_folder(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve(str(tmp_path / "no-such-model"))


def test_folder_without_config(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="config.json"):
        resolve(str(tmp_path))


def test_repo_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="Nothing is downloaded"):
        resolve("Salesforce/blip-image-captioning-base")


def test_export_cli_reports_missing_weights(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "itemrt.cli", "export", "--out", str(tmp_path / "b"), "--captioner", str(tmp_path / "x")],
        capture_output=True, text=True, check=False,
    )
    assert r.returncode == 2 and "WeightsNotFoundError" in r.stderr
