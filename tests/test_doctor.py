"""`item doctor` run for real on this machine: what it finds, the fixes it names, its exit
status per backend, and its plan of each graph against what the runtime really opens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from itemrt import Runtime
from itemrt.backends import BACKENDS, GRAPHS, OrtCudaBackend
from itemrt.backends.ort_cuda import Device, find_library
from itemrt.cli import main as item
from itemrt.doctor import ORT_GPU, cpu, cuda_state, examine, jetpack

NO_DRIVER = find_library("libcuda.so.1") is None


def doctor(*args: str) -> tuple[int, str]:
    """`item doctor` in a fresh interpreter: its output and exit status as a user sees them."""
    p = subprocess.run([sys.executable, "-m", "itemrt.cli", "doctor", *args], capture_output=True, text=True,
                       timeout=300, check=False)
    return p.returncode, p.stdout


@pytest.mark.skipif(not NO_DRIVER, reason="this machine has an NVIDIA driver: the no-CUDA findings cannot be seen")
def test_without_a_gpu_it_says_cuda_is_unavailable_and_why():
    rc, out = doctor()
    assert rc == 0, out
    machine = out[out.index("this machine"):out.index("\nbackends")].splitlines()
    lines = {line.split()[1]: line for line in machine if line.startswith(("  ok", "  --"))}
    assert "CUDA is unavailable" in lines["cuda-driver"] and "libcuda.so.1" in lines["cuda-driver"]
    assert lines["cuda-driver"].startswith("  --") and lines["gpu"].startswith("  --")
    assert "fix: install the NVIDIA driver" in out
    assert lines["onnxruntime"].startswith("  ok") and "CPUExecutionProvider" in lines["onnxruntime"]
    assert lines["cpu"].startswith("  ok") and "cores" in lines["cpu"]


@pytest.mark.skipif(not NO_DRIVER, reason="this machine has an NVIDIA driver")
def test_exit_status_says_whether_a_backend_runs_here():
    rc, out = doctor("--backend", "ort-cuda")
    assert rc == 1
    ort_cuda = next(i for i, line in enumerate(out.splitlines()) if line.startswith("  no  ort-cuda"))
    fix = out.splitlines()[ort_cuda + 1]
    assert "fix:" in fix and f"onnxruntime-gpu[cuda,cudnn]=={ORT_GPU}" in fix
    assert doctor("--backend", "onnxruntime")[0] == 0
    assert doctor("--backend", "tensorrt")[0] == 1


def test_json_report_with_a_bundle_matches_what_the_runtime_opens(tiny_bundle, monkeypatch, capsys):
    assert item(["doctor", str(tiny_bundle), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bundle"] == str(tiny_bundle) and set(r["backends"]) == set(BACKENDS)
    assert r["backends"]["onnxruntime"]["ok"] is True
    for name, b in r["backends"].items():
        assert set(b["plan"]) == set(GRAPHS), name
        assert b["ok"] == (b["why"] is None)
    cpu_plan = r["backends"]["onnxruntime"]["plan"]
    with Runtime(tiny_bundle, verify=False) as rt:  # the bundle's default precision on the CPU
        assert set(rt.sessions) == set(GRAPHS)
        assert {g: v["precision"] for g, v in cpu_plan.items()} == rt.precisions
        assert r["backends"]["onnxruntime"]["precision"] == rt.precision

    class OnCpu(OrtCudaBackend):  # ort-cuda's own class, on the CPU provider: what it really opens
        device = Device("cpu")

    monkeypatch.setitem(BACKENDS, "ort-cuda-on-cpu", OnCpu)
    with Runtime(tiny_bundle, backend="ort-cuda-on-cpu", verify=False) as rt:
        plan = r["backends"]["ort-cuda"]["plan"]
        assert {g: v["precision"] for g, v in plan.items()} == rt.precisions
        assert r["backends"]["ort-cuda"]["precision"] == rt.precision == "fp16"
    assert {v["engine"] for v in r["backends"]["tensorrt"]["plan"].values()} == {"TensorRT plan", "ONNX Runtime, CPU"}
    assert r["backends"]["tensorrt"]["plan"]["head"]["engine"] == "ONNX Runtime, CPU"


def test_text_report_with_a_bundle_has_the_table(tiny_bundle):
    rc, out = doctor(str(tiny_bundle))
    assert rc == 0
    table = out[out.index("bundle "):].splitlines()
    assert table[1].split()[:3] == ["graph", "onnxruntime", "[int8]"]
    rows = {line.split()[0]: line.split()[1:] for line in table[2:] if line.split() and line.split()[0] in GRAPHS}
    assert set(rows) == set(GRAPHS)
    assert rows["captioner_decoder"][1] == "fp16"  # ort-cuda: the FP16 graph its gate passed
    assert rows["head"][0] == "fp32"


def test_a_backend_that_cannot_run_this_bundle_fails_its_check(tiny_bundle):
    rc, out = doctor(str(tiny_bundle), "--backend", "tensorrt")
    assert rc == 1 and "no  tensorrt" in out


def test_cpu_features_and_jetpack_are_read_from_their_files(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 avx512_vnni amx_int8 amx_bf16\n")
    f = cpu(info)
    assert f.ok and f.detail.startswith("Test CPU") and "AVX-512 VNNI, AMX-INT8, AMX-BF16" in f.detail
    assert "AVX512-BF16" not in f.detail
    arm = tmp_path / "cpuinfo-arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert cpu(arm).ok
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan\n")
    j = jetpack(release)
    assert j.ok and j.detail.startswith("L4T R36.4.3, JetPack 6.x")
    release.write_text("garbage\n")
    assert not jetpack(release).ok
    assert not jetpack(tmp_path / "missing").ok
    release.write_bytes(b"")  # an empty file: the probe reports, never raises
    assert "probe failed" in jetpack(release).detail


def test_a_provider_is_proven_by_a_session():
    import onnxruntime as ort

    from itemrt.doctor import probe_session

    assert probe_session("CPUExecutionProvider") is None
    if "CUDAExecutionProvider" not in ort.get_available_providers() or NO_DRIVER:
        why = probe_session("CUDAExecutionProvider")
        assert why and "CPUExecutionProvider" in why  # ONNX Runtime opened it on the CPU, and it is said


def test_the_cuda_probe_never_raises():
    state = cuda_state()
    assert (state.driver is None) == (state.error is not None and not state.gpus)
    if NO_DRIVER:
        assert state.driver is None and "libcuda.so.1" in state.error
    r = examine()
    assert r.machine["cuda-driver"].ok == (state.driver is not None)
    assert r.gpus == state.gpus
