"""Weights are local only: a missing folder or cache entry is a clear error, never a download."""

from __future__ import annotations

from pathlib import Path

import pytest
from itemrt import UnsupportedModelError, WeightsNotFoundError
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


@pytest.fixture(scope="module")
def checkpoints(cache_dir):
    """The tiny random-init checkpoint folders (cached, as the tiny bundle's export made them)."""
    from itemrt.export.pipeline import random_checkpoints

    return {kind: Path(s.path) for kind, s in random_checkpoints("tiny", 0, progress=lambda m: None).items()}


@pytest.mark.parametrize("kind, given, found", [("captioner", "clip", "clip"), ("detector", "clip", "clip"),
                                                ("clip", "detector", "owlvit")])
def test_a_folder_of_another_model_is_refused(checkpoints, kind, given, found):
    """transformers loads any folder into any class with a warning, filling what does not fit
    with random weights: an OWL-ViT made from a CLIP folder loaded with 16 of its weights random."""
    from itemrt.export.models import load_models

    sources = {k: resolve(str(checkpoints[given if k == kind else k])) for k in checkpoints}
    with pytest.raises(UnsupportedModelError, match=f"holds a '{found}' model; --{kind} takes"):
        load_models(sources, progress=lambda m: None)


def test_a_checkpoint_lacking_weights_is_refused(checkpoints, tmp_path):
    import shutil

    from itemrt.export.models import load_models
    from safetensors.numpy import load_file, save_file

    partial = tmp_path / "captioner"
    shutil.copytree(checkpoints["captioner"], partial)
    weights = load_file(partial / "model.safetensors")
    dropped = sorted(k for k in weights if k.startswith("text_decoder.") and k.endswith("intermediate.dense.weight"))
    assert dropped
    save_file({k: v for k, v in weights.items() if k not in dropped}, partial / "model.safetensors", metadata={"format": "pt"})
    sources = {k: resolve(str(partial if k == "captioner" else checkpoints[k])) for k in checkpoints}
    with pytest.raises(UnsupportedModelError, match=rf"lacks {len(dropped)} weights of BlipForConditionalGeneration.*would be random"):
        load_models(sources, progress=lambda m: None)
    assert load_models({k: resolve(str(v)) for k, v in checkpoints.items()}, progress=lambda m: None)  # whole: loads
