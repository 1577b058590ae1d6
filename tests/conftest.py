"""Shared fixtures: one tiny random-init bundle per test session, exported by the real pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("itemrt-cache")
    os.environ["ITEMRT_CACHE"] = str(path)  # random-init checkpoints land here, not in ~/.cache
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, cache_dir) -> Path:
    from itemrt.backends.openvino import bf16_support
    from itemrt.export.pipeline import export_bundle

    out = tmp_path_factory.mktemp("engines") / "tiny"
    # bf16 is gated on the exporting CPU: only where it has BF16 units (tests then skip with why).
    precisions = ("int8", "fp16", "bf16") if bf16_support() is None else ("int8", "fp16")
    return export_bundle(out, random_init="tiny", seed=0, precisions=precisions, progress=lambda msg: None)


def need_precision(bundle: Path, precision: str) -> None:
    """Skip, saying why, when the tiny bundle has no `precision` gate record."""
    import json

    from itemrt.backends.openvino import bf16_support

    if precision not in json.loads((bundle / "manifest.json").read_text())["precisions"]:
        pytest.skip(f"{precision} was not exported here: {bf16_support()}")


@pytest.fixture(scope="session")
def runtime(tiny_bundle):
    from itemrt import Runtime

    with Runtime(tiny_bundle, precision="fp32") as rt:  # the exact-parity path
        yield rt


@pytest.fixture(scope="session")
def samples() -> list[Path]:
    from itemrt.samples import images

    paths = images()
    assert len(paths) >= 4
    return paths
