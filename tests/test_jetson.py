"""Jetson installs what docs/gpu.md says: the lean runtime, the gateway's serve extra and the
CUDA bindings of its Jetson steps all come as wheels for aarch64 CPython 3.10 (JetPack 6,
Ubuntu 22.04, glibc 2.35), so nothing x86-only or needing a compiler on the board creeps in.
pip resolves them for that platform here, from the package index, without installing."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "docs" / "gpu.md"  # the Jetson steps, moved out of README.md
# pip takes the exact platform tags it is given; JetPack 6's glibc 2.35 runs every manylinux
# tag up to 2_35.
PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{minor}_aarch64" for minor in range(17, 36)]
UNREACHABLE = re.compile(r"NewConnectionError|Failed to establish|Could not fetch URL|ProxyError|Temporary failure")


def _jetson_requirements() -> list[str]:
    """The project's own runtime and serve requirements, and what the README's Jetson steps add
    with `pip install -e . ...`."""
    reqs = []
    for req in importlib.metadata.requires("itemrt") or []:
        spec, _, marker = req.partition(";")
        if not marker.strip() or re.fullmatch(r"""extra\s*==\s*["']serve["']""", marker.strip()):
            reqs.append(spec.strip())
    steps = re.search(r"\*\*Jetson\*\*.*?```bash\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    line = next(line for line in steps.splitlines() if "pip install -e ." in line)
    extra = shlex.split(line.split(" #", 1)[0].split("pip install -e .", 1)[1])
    assert extra, "the README's Jetson step installs the CUDA bindings beside the runtime"
    return reqs + extra


def test_the_jetson_install_resolves_to_aarch64_wheels(tmp_path):
    reqs = _jetson_requirements()
    assert {"numpy", "pillow", "onnxruntime", "uvicorn", "cuda-python"} <= {re.split(r"[<>=!~ \[]", r)[0].lower() for r in reqs}
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--only-binary=:all:", "--python-version", "3.10", "--implementation", "cp",
           "--target", str(tmp_path / "site"), "--report", str(report)]
    cmd += [arg for p in PLATFORMS for arg in ("--platform", p)] + reqs
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("the package index did not answer pip within 300 s")
    if done.returncode and UNREACHABLE.search(done.stderr):
        pytest.skip(f"no package index here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, f"no aarch64 CPython 3.10 wheels for {reqs}:\n{done.stderr[-2000:]}"
    wheels = {i["metadata"]["name"].lower(): i["download_info"]["url"].rsplit("/", 1)[-1]
              for i in json.loads(report.read_text())["install"]}
    assert {"numpy", "pillow", "tokenizers", "onnxruntime", "starlette", "cuda-bindings"} <= set(wheels)
    for name, wheel in wheels.items():
        tags = wheel.removesuffix(".whl").split("-")[-1]  # the platform tags: any, or aarch64 ones
        assert tags == "any" or all(t.endswith("_aarch64") for t in tags.split(".")), f"{name}: {wheel}"
