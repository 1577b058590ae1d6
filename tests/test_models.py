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
    from itemrt.export.random_init import random_checkpoints

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


def test_a_checkpoint_whose_shapes_disagree_with_its_config_is_refused(checkpoints, tmp_path):
    """transformers raises a bare RuntimeError that names no tensor; the export names them."""
    import shutil

    from itemrt.export.models import load_models
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "captioner"
    shutil.copytree(checkpoints["captioner"], bad)
    weights = load_file(bad / "model.safetensors")
    key = sorted(k for k in weights if k.endswith("intermediate.dense.weight"))[0]
    weights[key] = weights[key][:-1]  # one row short of what config.json says
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    sources = {k: resolve(str(bad if k == "captioner" else checkpoints[k])) for k in checkpoints}
    with pytest.raises(UnsupportedModelError, match=rf"{bad}.*other shapes \({key}\)"):
        load_models(sources, progress=lambda m: None)


def _hub_snapshot(cache: Path, repo: str, folder: Path, sha: str, main: bool) -> Path:
    """A Hugging Face cache entry as downloading at a commit leaves it (no refs/main), or with refs/main."""
    import shutil

    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / sha)
    if main:
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text(sha)
    return entry / "snapshots" / sha


def test_a_cache_snapshot_without_refs_main_is_taken_at_its_revision(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = _hub_snapshot(tmp_path / "hub", "acme/tiny-blip", checkpoints["captioner"], sha, main=False)
    with pytest.raises(WeightsNotFoundError, match=rf"holds snapshots {sha} and refs none: pass acme/tiny-blip@<snapshot>"):
        resolve("acme/tiny-blip")
    s = resolve(f"acme/tiny-blip@{sha}")
    assert (s.model_id, Path(s.path), s.revision) == ("acme/tiny-blip", snapshot, sha)
    assert resolve("acme/tiny-blip", revision=sha).path == s.path
    with pytest.raises(WeightsNotFoundError, match=rf"acme/tiny-blip@{'f' * 40} is neither.*holds snapshots {sha}"):
        resolve(f"acme/tiny-blip@{'f' * 40}")


def test_a_cache_entry_with_refs_main_needs_no_revision(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    snapshot = _hub_snapshot(tmp_path / "hub", "acme/tiny-owl", checkpoints["detector"], sha, main=True)
    s = resolve("acme/tiny-owl")
    assert (Path(s.path), s.revision) == (snapshot, sha)


def _hub_2023_layout(src: Path, dst: Path, kind: str) -> Path:
    """`src` rewritten the way the Hub's files of that time are: a transformers 4.27 config.json
    (CLIP's sub-configs under the old `*_config_dict` keys), integer sizes in
    preprocessor_config.json, and weights in pytorch_model.bin without the tied copies."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["transformers_version"] = "4.27.0.dev0"
    if kind == "clip":
        for part in ("text_config", "vision_config"):
            cfg[f"{part}_dict"] = cfg.pop(part)
    (dst / "config.json").write_text(json.dumps(cfg))
    pp = json.loads((dst / "preprocessor_config.json").read_text())
    size = pp["size"]
    pp["size"] = size.get("shortest_edge") or size["height"]
    if "crop_size" in pp:
        pp["crop_size"] = pp["crop_size"]["height"]
    (dst / "preprocessor_config.json").write_text(json.dumps(pp))
    weights = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    tied = {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}
    torch.save({k: v for k, v in weights.items() if k not in tied}, dst / "pytorch_model.bin")
    return dst


def test_checkpoints_in_the_hubs_old_file_layout_load_as_the_same_models(checkpoints, tmp_path):
    import torch
    from itemrt.export.models import image_spec, load_models

    old = {k: _hub_2023_layout(v, tmp_path / k, k) for k, v in checkpoints.items()}
    assert not any((p / "model.safetensors").exists() for p in old.values())
    a = load_models({k: resolve(str(v)) for k, v in checkpoints.items()}, progress=lambda m: None)
    b = load_models({k: resolve(str(v)) for k, v in old.items()}, progress=lambda m: None)
    for part in ("blip", "owl", "clip"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
        assert image_spec(getattr(a, f"{part}_processor")) == image_spec(getattr(b, f"{part}_processor")), part
