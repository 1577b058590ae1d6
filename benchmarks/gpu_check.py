"""The prepared GPU measurement (issue 23): the whole ort-cuda check in one bounded run.

    python3 benchmarks/gpu_check.py --wheels .whl --work /tmp/gpucheck --out "$OUT" --budget-s 540

Run from the repository root on a GPU machine that reaches no package registry. Steps, each in
a child process bounded by what is left of `--budget-s`, each one's failure recorded and never
fatal (a later step that needs an earlier one's result says so and skips):

1. environment: Python, the GPU (nvidia-smi), torch, the onnxruntime already there;
2. install: the wheels sent along (`--wheels`: *.whl, or *.whl.part-* joined and checked
   against *.whl.sha256) into `WORK/site` with pip --no-deps --target, and itemrt itself
   staged beside them (runtime/, export/, benchmarks/ as setuptools maps them); every later
   step runs with that folder first on PYTHONPATH and pip's CUDA libraries on LD_LIBRARY_PATH;
3. export (started in the background right after install, in its own session so a second
   call can pick it up): `item export --random-init full --precisions fp16`;
4. doctor: `item doctor --json` and whether ort-cuda runs here;
5. tests: tests/test_ort_cuda.py and tests/test_doctor.py on this machine (the tiny bundle; on a
   GPU the ort-cuda tests that need CUDA run too), while the export runs;
6. parity: ort-cuda on the exported bundle against the PyTorch reference on the same device
   (tokens, words, found boxes and decisions kept; CLIP embedding cosine at least 0.999),
   each image again after others (CUDA graphs replayed), and whether the decoder's steps ran
   as CUDA graphs;
7. bench: item-bench in three calls, so a slow one cannot cost the others their report:
   ort-cuda-fp16 (with the CPU reference under --cpu-reference), then reference-cuda-fp16,
   then reference-compile;
8. report: `gpu-check.json` and `gpu-check.md` in `--out`, with the issue's goals met or not.

`--cpu` rehearses all of it on a machine without a GPU: a tiny bundle, ort-cuda's own code on
ONNX Runtime's CPU provider for the parity step, the CUDA benchmarks skipped with their reasons.
`--dry-run` prints the plan and runs nothing. A second call with the same `--work` skips the
steps that are done (state in WORK/state.json) and waits for an export still running.

Only the standard library at the top: this file runs before itemrt and its wheels are installed.
Its `--step parity` half runs inside the staged itemrt, as `python -m itemrt.bench.gpu_check`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The goals: full-size, random weights, batch 1, 20 tokens, 4 objects.
GOALS = {"p50_ms": 25.0, "vs_eager_fp16": 15.0, "vs_compile": 2.0, "batch8_images_per_s": 150.0}
COS_MIN = 0.999
BENCH = {  # step -> the item-bench backends it runs (one item-bench call each), most wanted first
    "bench-ort": ["ort-cuda-fp16"],
    "bench-eager": ["reference-cuda-fp16"],
    "bench-compile": ["reference-compile"],
}
# --cpu: the CPU reference and the same graphs on the CPU join ort-cuda's call, so the rehearsal
# has ok rows and an outputs check to read; on a GPU the parity step checks the outputs
CPU_ROWS = ["reference", "ort-fp16"]
RESERVE_S = 20  # kept back for the report


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok | failed | timeout | skipped | running
    seconds: float = 0.0
    detail: str = ""
    log: str = ""  # the tail of the step's output
    data: dict = field(default_factory=dict)


class Check:
    def __init__(self, args):
        self.args = args
        self.work, self.out = args.work.resolve(), args.out.resolve()
        self.site = self.work / "site"
        self.deadline = time.monotonic() + args.budget_s
        self.state_file = self.work / "state.json"
        self.steps: dict[str, Step] = {}
        if self.state_file.exists() and not args.redo:
            saved = json.loads(self.state_file.read_text())
            self.steps = {k: Step(**v) for k, v in saved.get("steps", {}).items()}
        self.bundle = (args.bundle or self.work / "engines" / ("tiny" if args.cpu else "full16")).resolve()

    # --- plumbing -------------------------------------------------------------------------

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   ITEMRT_CACHE=str(self.work / "cache"))
        if self.site.exists():
            env["PYTHONPATH"] = os.pathsep.join([str(self.site), *filter(None, [os.environ.get("PYTHONPATH")])])
        libs = cuda_library_dirs()
        if libs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, libs), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
        return env

    def child(self, cmd: list[str], timeout: float, log: Path | None = None) -> tuple[int | None, str]:
        """Run `cmd` in its own process group; None for its status if it ran out of time."""
        log = log or self.work / "logs" / f"{len(list((self.work / 'logs').glob('*')))}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env(),
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                rc = None
        return rc, tail(log)

    def run(self, name: str, fn, need: float = 30.0) -> Step:
        """Run a step unless done; a step that raises or runs out of time is recorded as such."""
        step = self.steps.get(name)
        if step is not None and step.status == "ok":
            return step
        step = self.steps[name] = Step(name)
        if self.left() < need:
            step.status, step.detail = "skipped", f"not enough of the budget left ({self.left():.0f} s, needs {need:.0f})"
            self.save()
            return step
        print(f"[gpu-check] {name} ({self.left():.0f} s left)", flush=True)
        t0 = time.monotonic()
        try:
            fn(step)
            if step.status in ("pending", "running"):
                step.status = "ok"
        except Exception as e:  # noqa: BLE001 - recorded; the next steps still run
            step.status, step.detail = "failed", f"{type(e).__name__}: {e}"
        step.seconds = round(time.monotonic() - t0, 1)
        print(f"[gpu-check] {name}: {step.status} in {step.seconds} s {step.detail}".rstrip(), flush=True)
        self.save()
        return step

    def save(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({"steps": {k: asdict(v) for k, v in self.steps.items()}}, indent=1))

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    # --- the steps ------------------------------------------------------------------------

    def environment(self, step: Step) -> None:
        d = step.data
        d["python"] = sys.version.split()[0]
        d["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        d["mode"] = "cpu rehearsal" if self.args.cpu else "gpu"
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=60, check=False)
            d["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        else:
            d["nvidia_smi"] = "nvidia-smi not found"
        probe = ("import json, importlib.metadata as m\nv = {}\nfor n in ('torch', 'onnxruntime', 'onnxruntime-gpu', "
                 "'transformers', 'tokenizers', 'numpy', 'onnx', 'defusedxml', 'cuda-bindings', 'nvidia-ml-py'):\n"
                 "    try: v[n] = m.version(n)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(v))")
        q = subprocess.run(self.python("-c", probe), capture_output=True, text=True, timeout=120, check=False)
        d["packages"] = json.loads(q.stdout) if q.returncode == 0 else q.stderr[-500:]

    def install(self, step: Step) -> None:
        wheels = join_parts(self.args.wheels, self.work / "wheels") if self.args.wheels else []
        step.data["wheels"] = [w.name for w in wheels]
        if wheels:
            rc, log = self.child([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
                                  "--no-cache-dir", "--upgrade", "--target", str(self.site), *map(str, wheels)],
                                 min(self.left(), 300))
            step.log = log
            if rc != 0:
                raise RuntimeError(f"pip install exited {rc}")
        stage_itemrt(self.site)
        rc, log = self.child(self.python("-c", "import onnxruntime as o, itemrt; print(itemrt.__file__); "
                                               "print(o.__version__, o.__file__, o.get_available_providers())"), 120)
        step.log += log
        if rc != 0:
            raise RuntimeError("itemrt or onnxruntime does not import from the staged folder")
        step.detail = log.strip().splitlines()[-1] if log.strip() else ""

    def start_export(self, step: Step) -> None:
        """The long step: in the background, in its own session (a later call can wait for it)."""
        if (self.bundle / "manifest.json").exists():
            step.detail = f"bundle {self.bundle} already exported"
            return
        if self.args.bundle is not None:
            raise FileNotFoundError(f"--bundle {self.bundle} has no manifest.json")
        rcfile = self.work / "export.rc"
        if export_running(self.work):
            step.status, step.detail = "running", "an export started earlier is still running"
            return
        size = "tiny" if self.args.cpu else "full"
        cmd = [sys.executable, "-m", "itemrt.cli", "export", "--random-init", size, "--out", str(self.bundle),
               "--precisions", "fp16"]
        if self.args.export_images:
            from_samples = sorted((ROOT / "runtime" / "samples").glob("*.jpg"))[: self.args.export_images]
            cmd += ["--parity-images", *map(str, from_samples)]
        rcfile.unlink(missing_ok=True)
        log = self.work / "logs" / "export.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        shell = f'{" ".join(map(_quote, cmd))} > {_quote(str(log))} 2>&1; echo $? > {_quote(str(rcfile))}'
        p = subprocess.Popen(["/bin/sh", "-c", shell], cwd=ROOT, env=self.env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (self.work / "export.pid").write_text(str(p.pid))
        step.status, step.detail = "running", f"started: {' '.join(cmd[2:])}"

    def wait_export(self, step: Step) -> None:
        if (self.bundle / "manifest.json").exists() and not export_running(self.work):
            step.detail = f"bundle {self.bundle}"
            return
        rcfile, t0 = self.work / "export.rc", time.monotonic()
        while not rcfile.exists() and export_running(self.work):
            if self.left() < 60:
                step.status, step.detail = "timeout", "the export is still running (a second call waits for it)"
                step.log = tail(self.work / "logs" / "export.log")
                return
            time.sleep(2)
        step.log = tail(self.work / "logs" / "export.log")
        rc = rcfile.read_text().strip() if rcfile.exists() else "?"
        if rc != "0" or not (self.bundle / "manifest.json").exists():
            raise RuntimeError(f"item export exited {rc}")
        step.detail = f"bundle {self.bundle}, waited {time.monotonic() - t0:.0f} s"
        manifest = json.loads((self.bundle / "manifest.json").read_text())
        step.data = {"export_seconds": manifest.get("export_seconds"),
                     "fp16_used": manifest.get("precisions", {}).get("fp16", {}).get("used")}

    def doctor(self, step: Step) -> None:
        rc, log = self.child(self.python("-m", "itemrt.cli", "doctor", "--json"), min(self.left(), 120),
                             self.work / "logs" / "doctor.log")
        text = log[log.index("{"):] if "{" in log else ""
        try:
            step.data = json.loads(text)
        except ValueError:
            step.log = log
            raise RuntimeError(f"item doctor exited {rc} without a report") from None
        ort_cuda = step.data["backends"]["ort-cuda"]
        step.detail = "ort-cuda runs here" if ort_cuda["ok"] else f"ort-cuda cannot run here: {ort_cuda['why']}"

    def tests(self, step: Step) -> None:
        rc, log = self.child(self.python("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "not rehearses_on_cpu",
                                         "tests/test_ort_cuda.py", "tests/test_doctor.py"),
                             min(self.left(), self.args.tests_s), self.work / "logs" / "tests.log")
        step.log = log
        last = [line for line in log.splitlines() if " passed" in line or " failed" in line or "error" in line]
        step.detail = last[-1].strip("= ") if last else f"pytest exited {rc}"
        if rc is None:
            step.status = "timeout"
        elif rc != 0:
            step.status = "failed"

    def parity(self, step: Step) -> None:
        out = self.work / "parity.json"
        out.unlink(missing_ok=True)
        cmd = self.python("-m", "itemrt.bench.gpu_check", "--step", "parity", "--bundle", str(self.bundle),
                          "--work", str(self.work), "--out", str(out), "--tokens", str(self.args.tokens))
        cmd += ["--cpu"] if self.args.cpu else []
        rc, log = self.child(cmd, min(self.left(), 300), self.work / "logs" / "parity.log")
        step.log = log
        if not out.exists():
            raise RuntimeError(f"the parity check exited {rc} without a result")
        step.data = json.loads(out.read_text())
        step.detail = step.data["summary"]
        if not step.data["passed"]:
            step.status = "failed"

    def bench(self, step: Step, backends: list[str], charts: bool) -> None:
        a = self.args
        report = self.out / f"{step.name}.json"
        cmd = self.python("-m", "itemrt.bench.cli", str(self.bundle), "--backends", *backends,
                          "--runs", str(a.runs), "--warmup", str(a.warmup), "--tokens", str(a.tokens),
                          "--objects", "4", "--batch-sizes", *map(str, a.batch_sizes), "--callers", "1",
                          "--throughput-repeats", "1", "--json", str(report),
                          "--markdown", str(self.work / f"{step.name}.md"))
        cmd += ["--charts", str(self.out)] if charts else []
        rc, log = self.child(cmd, self.left(), self.work / "logs" / f"{step.name}.log")
        step.log = log
        if not report.exists():
            step.status = "timeout" if rc is None else "failed"
            step.detail = f"item-bench exited {rc} without a report"
            return
        rep = json.loads(report.read_text())
        step.data = {"machine": rep.get("machine"), "backends": {n: summarize(b) for n, b in rep["backends"].items()}}
        step.detail = "; ".join(f"{n}: {b.get('total_p50_ms', b.get('reason'))}" for n, b in step.data["backends"].items())
        if rc not in (0, 1):  # 1: some outputs differ from the reference, which the report shows
            step.status = "failed"

    # --- the whole check ------------------------------------------------------------------

    def plan(self) -> list[str]:
        a = self.args
        benches = self.benches()
        return [
            f"budget {a.budget_s} s, work {self.work}, out {self.out}, bundle {self.bundle}",
            f"install: {', '.join(p.name for p in sorted(a.wheels.glob('*'))) if a.wheels else 'no wheels'} -> {self.site}",
            f"export ({'tiny' if a.cpu else 'full'}, fp16) in the background",
            "doctor; tests (tests/test_ort_cuda.py tests/test_doctor.py) while it runs",
            f"parity: ort-cuda{' on the CPU provider' if a.cpu else ''} against the reference, {a.tokens} tokens",
            *(f"{k}: item-bench {' '.join(v)} --runs {a.runs} --batch-sizes {' '.join(map(str, a.batch_sizes))}"
              for k, v in benches.items() if k not in a.skip),
            f"report: {self.out / 'gpu-check.json'}, {self.out / 'gpu-check.md'}",
        ]

    def main(self) -> int:
        a = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.run("environment", self.environment, need=5)
        install = self.run("install", self.install, need=20)
        if install.status != "ok":
            self.skip_all("install failed: nothing can run without itemrt and onnxruntime")
            return self.report()
        stage_itemrt(self.site)  # again on a second call: the wheels stay, the code is this checkout's
        self.run("export-start", self.start_export, need=5)
        self.run("doctor", self.doctor, need=10)
        if "tests" not in a.skip:
            self.run("tests", self.tests, need=60)
        export = self.run("export", self.wait_export, need=60)
        if export.status != "ok":
            self.skip_all(f"no bundle: export {export.status} ({export.detail})")
            return self.report()
        self.run("parity", self.parity, need=60)
        for i, (name, backends) in enumerate(self.benches().items()):
            if name in a.skip:
                continue
            self.run(name, lambda step, b=backends, c=i == 0: self.bench(step, b, c), need=60 if i == 0 else 45)
        return self.report()

    def benches(self) -> dict[str, list[str]]:
        a = self.args
        extra = CPU_ROWS if a.cpu else ["reference"] if a.cpu_reference else []
        return {k: (v + extra if k == "bench-ort" else v) for k, v in BENCH.items()}

    def skip_all(self, why: str) -> None:
        for name in ("doctor", "tests", "parity", *BENCH):
            if name not in self.steps:
                self.steps[name] = Step(name, "skipped", detail=why)
        self.save()

    def report(self) -> int:
        rep = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(sys.argv), "mode": "cpu rehearsal" if self.args.cpu else "gpu",
               "steps": {k: asdict(v) for k, v in self.steps.items()}, "goals": goals(self.steps)}
        (self.out / "gpu-check.json").write_text(json.dumps(rep, indent=1) + "\n")
        (self.out / "gpu-check.md").write_text(markdown(rep))
        print(markdown(rep))
        return 0


# --- helpers (standard library only) ------------------------------------------------------------


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def export_running(work: Path) -> bool:
    pid = work / "export.pid"
    if not pid.exists() or (work / "export.rc").exists():
        return False
    try:
        os.kill(int(pid.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def join_parts(folder: Path, joined: Path) -> list[Path]:
    """The wheels in `folder`: NAME.whl as they are; NAME.whl.part-* joined in name order into
    `joined`/NAME.whl (and checked against NAME.whl.sha256 when it is there)."""
    folder = folder.resolve()
    parts: dict[str, list[Path]] = {}
    for p in sorted(folder.glob("*.whl.part-*")):
        parts.setdefault(p.name.split(".part-")[0], []).append(p)
    for name, pieces in parts.items():
        joined.mkdir(exist_ok=True)
        target = joined / name
        digest = hashlib.sha256()
        with open(target, "wb") as f:
            for piece in pieces:
                data = piece.read_bytes()
                digest.update(data)
                f.write(data)
        want = folder / f"{name}.sha256"
        if want.exists() and want.read_text().split()[0] != digest.hexdigest():
            raise ValueError(f"{name}: sha256 of the joined parts differs from {want.name} (a part missing?)")
    return sorted(folder.glob("*.whl")) + sorted(joined.glob("*.whl") if joined.exists() else [])


def stage_itemrt(site: Path) -> None:
    """itemrt as setuptools lays it out (package-dir in pyproject.toml), without pip or a build."""
    site.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
    target = site / "itemrt"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(ROOT / "runtime", target, ignore=ignore)
    shutil.copytree(ROOT / "export", target / "export", ignore=ignore)
    shutil.copytree(ROOT / "benchmarks", target / "bench", ignore=ignore)


def cuda_library_dirs() -> list[Path]:
    """pip's NVIDIA library folders in this interpreter's site-packages (onnxruntime-gpu,
    installed apart from them, would not look there)."""
    import site as _site

    dirs = []
    for root in dict.fromkeys(Path(p) for p in [*_site.getsitepackages(), *sys.path] if p):
        dirs += sorted(root.glob("nvidia/*/lib"))
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def summarize(b: dict) -> dict:
    """The numbers the report needs from one item-bench backend."""
    if b.get("status") != "ok":
        return {"status": b.get("status"), "reason": b.get("reason")}
    s = {"status": "ok", "total_p50_ms": round(b["stages_ms"]["total"]["p50"], 2),
         "stages_p50_ms": {k: round(v["p50"], 2) for k, v in b["stages_ms"].items()},
         "precisions": b.get("precisions"), "load_s": b.get("load_s"),
         "outputs_match_reference": b.get("outputs_match_reference"), "mismatches": b.get("mismatches")}
    for key in ("gpu", "gpu_peak_mb", "gpu_busy", "speedup_vs_reference"):
        if key in b:
            s[key] = b[key]
    if "gpu_stages_ms" in b:
        s["gpu_stages_p50_ms"] = {k: round(v["p50"], 2) for k, v in b["gpu_stages_ms"].items()}
    if "throughput" in b:
        s["images_per_s"] = {k: round(v["images_per_s"], 2) for k, v in b["throughput"].get("batch", {}).items()}
    return s


def _bench(steps: dict[str, Step], name: str) -> dict | None:
    for step in steps.values():
        b = step.data.get("backends", {}).get(name) if step.name.startswith("bench") else None
        if b and b.get("status") == "ok":
            return b
    return None


def goals(steps: dict[str, Step]) -> dict:
    """The issue's goals, each met, missed or not measured (with why)."""
    ort, eager, comp = _bench(steps, "ort-cuda-fp16"), _bench(steps, "reference-cuda-fp16"), _bench(steps, "reference-compile")
    out = {}

    def goal(key, value, want, better):
        if value is None:
            out[key] = {"status": "not measured"}
        else:
            out[key] = {"value": round(value, 2), "goal": want, "status": "met" if better(value, want) else "missed"}

    p50 = ort["total_p50_ms"] if ort else None
    goal("p50_ms", p50, GOALS["p50_ms"], lambda v, w: v <= w)
    goal("vs_eager_fp16", eager["total_p50_ms"] / p50 if p50 and eager else None, GOALS["vs_eager_fp16"], lambda v, w: v >= w)
    goal("vs_compile", comp["total_p50_ms"] / p50 if p50 and comp else None, GOALS["vs_compile"], lambda v, w: v >= w)
    goal("batch8_images_per_s", (ort or {}).get("images_per_s", {}).get("8"), GOALS["batch8_images_per_s"],
         lambda v, w: v >= w)
    parity = steps.get("parity")
    out["outputs_kept"] = {"status": "not measured"} if parity is None or not parity.data else \
        {"status": "met" if parity.data.get("passed") else "missed", "value": parity.data.get("summary")}
    out["gpu_peak_mb"] = {"value": ort.get("gpu_peak_mb") if ort else None, "status": "reported" if ort else "not measured"}
    return out


def markdown(rep: dict) -> str:
    lines = [f"# GPU check ({rep['mode']}), {rep['created']}", "", f"`{rep['command']}`", "",
             "| step | status | seconds | detail |", "| --- | --- | ---: | --- |"]
    for s in rep["steps"].values():
        detail = str(s["detail"]).replace("|", "/").replace("\n", " ")[:300]
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {detail} |")
    lines += ["", "| goal | value | goal | status |", "| --- | ---: | ---: | --- |"]
    for k, g in rep["goals"].items():
        lines.append(f"| {k} | {g.get('value', '')} | {g.get('goal', '')} | {g['status']} |")
    for s in rep["steps"].values():
        for name, b in s["data"].get("backends", {}).items() if s["name"].startswith("bench") else []:
            if b.get("status") != "ok":
                lines.append(f"\n{name}: {b.get('status')} ({b.get('reason')})")
                continue
            lines.append(f"\n{name}: p50 {b['total_p50_ms']} ms; stages " + ", ".join(
                f"{k} {v}" for k, v in b["stages_p50_ms"].items() if k != "total"))
            if "gpu_stages_p50_ms" in b:
                lines.append("  device time (CUDA events) " + ", ".join(f"{k} {v}" for k, v in b["gpu_stages_p50_ms"].items()))
            for key in ("images_per_s", "gpu_peak_mb", "gpu_busy", "outputs_match_reference"):
                if b.get(key) is not None:
                    lines.append(f"  {key}: {b[key]}")
    return "\n".join(lines) + "\n"


# --- the parity step (runs inside the staged itemrt) ----------------------------------------------


def parity_step(args) -> int:
    """ort-cuda against the PyTorch reference on the same device, image by image."""
    import numpy as np
    import torch
    from itemrt import Runtime
    from itemrt.backends import BACKENDS, OrtCudaBackend
    from itemrt.backends.ort_cuda import Device
    from itemrt.export.parity import _embed_cos
    from itemrt.export.reference import reference_for_bundle
    from itemrt.samples import images as sample_images
    from itemrt.stages.images import load_image
    from itemrt.stages.recipe import normalize

    backend, device = "ort-cuda", "cuda"
    if args.cpu:  # ort-cuda's own sessions on the CPU provider, against the reference on the CPU
        class OnCpu(OrtCudaBackend):
            device = Device("cpu")

        BACKENDS["ort-cuda-cpu"] = OnCpu
        backend, device = "ort-cuda-cpu", "cpu"
    images = [load_image(p) for p in sample_images()]
    ref = reference_for_bundle(args.bundle).to(device, torch.float32)
    want = [ref.run(img, max_new_tokens=args.tokens) for img in images]
    rows, order = [], [0, 1, 0, 2, 1, 3, 0, 2, 3][: 2 * len(images) + 1]
    with Runtime(args.bundle, backend=backend, precision="fp16") as rt:
        first = {}
        for i in order:  # every image again after others: replayed CUDA graphs must read the new image
            a = rt.analyze_batch([images[i]], max_new_tokens=args.tokens)[0]
            r, w = a.result, want[i]

            def cos(x, y):
                x, y = np.atleast_2d(x), np.atleast_2d(y)
                return float(np.min(np.sum(normalize(x) * normalize(y), -1))) if len(x) and len(y) else 1.0

            row = {"image": i, "tokens_equal": r.caption_tokens == w.tokens,
                   "words_equal": [o.word for o in r.objects] == w.words,
                   "found_equal": [o.found for o in r.objects] == w.found,
                   "decision_equal": (r.p_fake >= 0.5) == (w.p_fake >= 0.5),
                   "p_fake_abs_diff": abs(r.p_fake - w.p_fake),
                   "same_as_first_time": first.setdefault(i, r.caption_tokens) == r.caption_tokens}
            # the gate's measure (export.parity): CLIP on the reference's own crops and texts, so
            # a box a pixel off does not count against the graphs; the chain's crops, for information
            row["embed_cos_min"] = min(_embed_cos(rt, images[i], r, w))
            row["chain_embed_cos_min"] = min(
                cos(a.pairs.global_image, w.image_embeds[0]), cos(a.pairs.global_text, w.text_embeds[0]),
                cos(a.pairs.local_image, w.image_embeds[1:]) if row["found_equal"] else 1.0,
                cos(a.pairs.local_text, w.text_embeds[1:]) if row["found_equal"] else 1.0)
            rows.append(row)
        decoder = rt.sessions["captioner_decoder"]
        graphs = decoder.graphs_off or "on"
        precisions = rt.precisions
    keys = ("tokens_equal", "words_equal", "found_equal", "decision_equal", "same_as_first_time")
    distinct = len({tuple(w.tokens) for w in want}) > 1
    differ = len({tuple(first[i]) for i in first}) > 1 if distinct else True
    passed = all(all(r[k] for k in keys) for r in rows) and min(r["embed_cos_min"] for r in rows) >= COS_MIN and differ
    summary = (f"{'passed' if passed else 'FAILED'}: {sum(all(r[k] for k in keys) for r in rows)}/{len(rows)} runs kept "
               f"tokens, words, boxes and decisions; embedding cos min {min(r['embed_cos_min'] for r in rows):.6f} "
               f"(on the chain's own crops {min(r['chain_embed_cos_min'] for r in rows):.6f}); "
               f"different images different captions: {differ}; decoder CUDA graphs: {graphs}")
    Path(args.out).write_text(json.dumps({"passed": passed, "summary": summary, "runs": rows, "backend": backend,
                                          "device": device, "precisions": precisions, "cuda_graphs": graphs}, indent=1))
    print(summary)
    return 0 if passed else 1


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/gpucheck"), help="state, logs, the bundle, the install")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")), help="the report's folder")
    p.add_argument("--wheels", type=Path, default=None, help="wheels to install first (*.whl, *.whl.part-*)")
    p.add_argument("--bundle", type=Path, default=None, help="an exported bundle (default: export one into WORK)")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall time for the whole check")
    p.add_argument("--cpu", action="store_true", help="rehearse on a machine without a GPU (tiny bundle)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--redo", action="store_true", help="forget the steps a former call finished")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", *BENCH], help="steps to leave out")
    p.add_argument("--cpu-reference", action="store_true",
                   help="the PyTorch reference on the CPU in ort-cuda's item-bench call too (its speed-up and outputs check)")
    p.add_argument("--export-images", type=int, default=2,
                   help="sample images the export's parity gates use (0: all); fewer is faster")
    p.add_argument("--tests-s", type=float, default=240.0, help="at most this long for the tests")
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="warm-up runs (CUDA graphs are captured in the first)")
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--step", choices=["parity"], default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.step == "parity":
        return parity_step(args)
    check = Check(args)
    if args.dry_run:
        print("\n".join(check.plan()))
        return 0
    return check.main()


if __name__ == "__main__":
    sys.exit(main())
