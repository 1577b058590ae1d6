"""What every engine offers the chain: name-based I/O, loud failure, and a say in where
tensors live (host memory, or left on the device between graphs)."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class KVLoop(Protocol):
    """Greedy-decoding state of the captioner's decoder: one `step` per token."""

    def step(self, ids: np.ndarray) -> np.ndarray: ...  # token ids in, logits out


class Session(Protocol):
    """One graph on one engine: OrtSession (ort.py), OrtDeviceSession (ort_cuda.py), OvSession (openvino.py),
    TrtSession (tensorrt.py)."""

    name: str
    inputs: dict[str, type]
    outputs: list[str]
    # True: `run_on_device` leaves outputs on the device and `kv_loop` takes them as they are
    resident: bool

    # Host arrays by name. A resident session may leave the outputs the chain hands unchanged to
    # another graph on the device (ort_cuda.HANDOFFS); such a value takes `np.asarray` to be read.
    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]: ...

    def run_on_device(self, feeds: dict[str, np.ndarray]) -> dict: ...

    def kv_loop(self, cross: dict, kv_shape: tuple[int, ...]) -> KVLoop: ...

    def close(self) -> None: ...


class HostSession:
    """Base of the engines whose tensors live in host memory (ONNX Runtime on CPU, OpenVINO):
    "on the device" is the host, and the decoder's K/V cache is a numpy array."""

    resident = False

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def run_on_device(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run(feeds)

    def kv_loop(self, cross: dict[str, np.ndarray], kv_shape: tuple[int, ...]) -> HostKV:
        return HostKV(self, cross, kv_shape)

    def close(self) -> None:
        """Nothing to free: the engine's memory goes with the object."""


class HostKV:
    """Decoder state in host memory: each step feeds the last step's present K/V back as past."""

    def __init__(self, decoder: Session, cross: dict[str, np.ndarray], kv_shape: tuple[int, ...]):
        self.decoder, self.cross = decoder, cross
        self.past = np.zeros(kv_shape, np.float32)

    def step(self, ids: np.ndarray) -> np.ndarray:
        out = self.decoder.run({"input_ids": ids, "past_kv": self.past, **self.cross})
        self.past = out["present_kv"]
        return out["logits"]


def check_feeds(name: str, inputs: dict, feeds: dict[str, np.ndarray]) -> None:
    """Name-based I/O fails loudly: every input by name, each in its exact dtype."""
    if feeds.keys() != inputs.keys():
        raise ValueError(f"{name}: inputs are {sorted(inputs)}, got {sorted(feeds)}")
    for k, v in feeds.items():
        if v.dtype != inputs[k]:
            raise TypeError(f"{name}: input {k} must be {np.dtype(inputs[k])}, got {v.dtype}")
