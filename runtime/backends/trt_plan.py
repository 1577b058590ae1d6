"""Everything around the TensorRT calls that needs no TensorRT: which graphs become plans,
their optimization profiles (from the manifest), device buffer planning, and the checks
that make a plan from another TensorRT version or GPU fail closed with the rebuild command.

`itemrt.export.build` (the builder) and `itemrt.backends.tensorrt` (the runtime backend) are thin
layers over the documented TensorRT 10.x / 11.x API that use this module for the rest.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import BundleVersionError

# The graphs that become plans. The object words' text towers are replaced by the bundle's
# word bank, so detector_text never runs; the head (a few-KB MLP, microseconds) stays on ONNX
# Runtime, so retraining it never invalidates the engines.
ENGINE_COMPONENTS = (
    "captioner_vision",
    "captioner_cross_kv",
    "captioner_decoder",
    "detector_image",
    "detector_head",
    "clip_image",
    "clip_text",
)
PLANS_DIR = "tensorrt"
ALIGN = 256  # bytes; TensorRT wants tensor addresses aligned, 256 suits every dtype and vector load
DTYPE_SIZES = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "bool": 1}

Shape = tuple[int, ...]


@dataclass(frozen=True)
class BuildSettings:
    max_batch: int = 4  # images per detect_batch call the plans accept
    workspace_gb: float = 4.0
    opt_batch: int = 1  # the batch TensorRT tunes kernels for (gateways mostly run 1)

    def to_dict(self) -> dict:
        return asdict(self)


def axis_bounds(component: str, manifest: dict, s: BuildSettings) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every named input axis of a component, from the bundle's limits."""
    k = int(manifest["words"]["max_objects"])
    t = int(manifest["captioner"]["decoding"]["max_new_tokens"])
    b, o = s.max_batch, min(s.opt_batch, s.max_batch)
    bounds = {"batch": (1, o, b)}
    if component == "clip_image":  # [I0, crops] of every image in one call
        bounds["batch"] = (1, o * (1 + k), b * (1 + k))
    elif component == "captioner_decoder":
        bounds["tokens"] = (1, 1, 1)  # greedy: one new token per step
        bounds["past"] = (0, max(0, t // 2), max(0, t - 1))  # 0 on the first step
    elif component == "detector_head":
        bounds["queries"] = (1, k, k)
    elif component == "clip_text":
        bounds["sequence"] = (1, min(16, _text_max(manifest)), _text_max(manifest))
    return bounds


def _text_max(manifest: dict) -> int:
    return int(manifest["clip"]["tokenizer"]["max_length"])


def profiles(manifest: dict, s: BuildSettings) -> dict[str, dict[str, tuple[Shape, Shape, Shape]]]:
    """Component -> input name -> (min, opt, max) shapes: one optimization profile each."""
    out = {}
    for name in ENGINE_COMPONENTS:
        comp = manifest["components"][name]
        bounds = axis_bounds(name, manifest, s)
        prof = {}
        for i in comp["inputs"]:
            dims = []
            for d in i["shape"]:
                if isinstance(d, int):
                    dims.append((d, d, d))
                elif d in bounds:
                    dims.append(bounds[d])
                else:
                    raise BundleVersionError(f"{name}: input {i['name']} has axis {d!r} with no build limit")
            prof[i["name"]] = tuple(tuple(x[j] for x in dims) for j in range(3))
        out[name] = prof
    return out


def check_shape(component: str, name: str, shape: Shape, profile: tuple[Shape, Shape, Shape], rebuild: str) -> None:
    """A runtime shape outside the plan's profile is an error that names the fix."""
    lo, _, hi = profile
    if len(shape) != len(lo) or any(not (a <= d <= b) for d, a, b in zip(shape, lo, hi)):
        raise BundleVersionError(
            f"{component}: input {name} has shape {tuple(shape)}, outside the engine's profile {lo}..{hi}; "
            f"rebuild with larger limits: {rebuild}"
        )


@dataclass(frozen=True)
class Slot:
    offset: int
    nbytes: int
    dtype: str
    shape: Shape  # the largest shape the slot holds


@dataclass(frozen=True)
class BufferPlan:
    """One device allocation per engine and profile, carved into aligned slots (and one pinned
    host allocation of the same layout), sized for the profile's largest shapes."""

    slots: dict[str, Slot]
    total: int

    @classmethod
    def for_shapes(cls, shapes: dict[str, tuple[Shape, str]]) -> BufferPlan:
        slots, offset = {}, 0
        for name, (shape, dtype) in shapes.items():
            if dtype not in DTYPE_SIZES:
                raise BundleVersionError(f"tensor {name}: dtype {dtype} is not supported by the TensorRT backend")
            if any(d < 0 for d in shape):
                raise BundleVersionError(f"tensor {name}: shape {shape} is not bounded by the profile")
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[dtype]
            slots[name] = Slot(offset, nbytes, dtype, tuple(shape))
            offset += -(-max(nbytes, 1) // ALIGN) * ALIGN
        return cls(slots, offset)

    def fits(self, name: str, shape: Shape) -> bool:
        s = self.slots[name]
        return int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[s.dtype] <= s.nbytes


KV_SCRATCH = ("kv~0", "kv~1")  # the decoder's self-attention cache, ping-ponged by tensorrt.DeviceKV
DECODER_STAGED = ("input_ids", "logits")  # all that a decoder step moves between host and GPU


def worker_plan(io: dict[str, tuple[Shape, str]]) -> BufferPlan:
    """The slots of one worker, from its plan's I/O tensors at their largest shapes. A decoder
    plan (it returns `present_kv`) gets slots for the step's ids and logits and two cache
    buffers shaped like `present_kv`, nothing for the cross K/V or `past_kv`/`present_kv`:
    DeviceKV binds those to the GPU memory that already holds them (slots for the cross K/V
    would take device and pinned host memory per image of the batch, never used: docs/design.md §10)."""
    if "present_kv" not in io:
        return BufferPlan.for_shapes(io)
    return BufferPlan.for_shapes({**{n: io[n] for n in DECODER_STAGED}, **{b: io["present_kv"] for b in KV_SCRATCH}})


def target_key(trt_version: str, compute_capability: tuple[int, int], gpu_name: str) -> str:
    """Where a build's plans live: a plan runs only on the TensorRT version and GPU model
    that built it (clip_trt names its engines by version and SM the same way)."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    return f"sm{compute_capability[0]}{compute_capability[1]}-{slug}-trt{trt_version}"


def rebuild_command(root, settings: dict | None = None) -> str:
    s = settings or BuildSettings().to_dict()
    return f"item build {root} --max-batch {s['max_batch']} --workspace-gb {s['workspace_gb']}"


def select_plans(manifest: dict, root, trt_version: str, gpu_name: str, compute_capability: tuple[int, int]) -> dict:
    """The manifest's build for this TensorRT version and GPU, or a typed error with the exact
    rebuild command."""
    builds = manifest.get("tensorrt", {})
    key = target_key(trt_version, compute_capability, gpu_name)
    if not builds:
        raise BundleVersionError(f"bundle {root} has no TensorRT engines; build them on this machine: {rebuild_command(root)}")
    if key not in builds:
        have = ", ".join(f"{k} ({b['gpu']})" for k, b in builds.items())
        settings = next(iter(builds.values()))["settings"]
        raise BundleVersionError(
            f"bundle {root} has TensorRT engines for {have}, not for this machine ({key}, {gpu_name}); "
            f"plans only run on the TensorRT version and GPU that built them. Rebuild: {rebuild_command(root, settings)}"
        )
    build = builds[key]
    missing = [c for c in ENGINE_COMPONENTS if c not in build["plans"]]
    if missing:
        raise BundleVersionError(f"TensorRT build {key} of {root} lacks {missing}; rebuild: {rebuild_command(root, build['settings'])}")
    return build
