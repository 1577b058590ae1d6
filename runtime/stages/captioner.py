"""BLIP captioner: vision encoder, cross-attention K/V once per image, greedy KV-cache decoding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backends.base import Session
from ..errors import BundleVersionError
from .text import TextTokenizer


@dataclass(frozen=True)
class DecodingSpec:
    bos_id: int
    eos_id: int
    pad_id: int
    max_new_tokens: int
    layers: int
    heads: int
    head_dim: int
    strategy: str = "greedy"

    @classmethod
    def from_dict(cls, d: dict) -> DecodingSpec:
        spec = cls(**d)
        if spec.strategy != "greedy":  # the only decoding the reference gate checked
            raise BundleVersionError(f"captioner decoding {spec.strategy!r} is not supported; only greedy is")
        return spec


def cross_inputs(layers: int) -> list[str]:
    """The decoder graph's cross-attention inputs: K of each layer, then V of each layer (one input
    per layer, so a step slices nothing: see `export.graphs.BlipDecoderStep`)."""
    return [f"cross_k.{i}" for i in range(layers)] + [f"cross_v.{i}" for i in range(layers)]


@dataclass
class Captions:
    texts: list[str]
    tokens: list[list[int]]  # generated ids per image, end-of-sentence included when reached


class Captioner:
    def __init__(
        self,
        vision: Session,
        cross_kv: Session,
        decoder: Session,
        tokenizer: TextTokenizer,
        spec: DecodingSpec,
    ):
        self.vision, self.cross, self.decoder = vision, cross_kv, decoder
        self.tokenizer, self.spec = tokenizer, spec

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self.vision.run({"pixel_values": pixels})["image_embeds"]

    def cross_kv(self, image_embeds: np.ndarray) -> tuple:
        """K/V stay where the decoder takes them: on the device when both graphs run there
        (`generate` on this thread), in host memory otherwise."""
        feeds = {"image_embeds": image_embeds}
        resident = self.cross.resident and self.decoder.resident
        out = self.cross.run_on_device(feeds) if resident else self.cross.run(feeds)
        return out["cross_k"], out["cross_v"]

    def generate(self, cross_k, cross_v, max_new_tokens: int | None = None) -> Captions:
        """Greedy decoding, the same as `generate(do_sample=False, num_beams=1)` of the reference.
        `cross_k`, `cross_v`: what `cross_kv` returned, on this thread."""
        s = self.spec
        limit = s.max_new_tokens if max_new_tokens is None else max_new_tokens
        batch = cross_k.shape[1]
        kv_shape = (s.layers, 2, batch, s.heads, 0, s.head_dim)
        # one input per layer: views into the stacked (L, B, H, S, Dh) K/V (axis 0 outermost: no copy)
        cross = dict(zip(cross_inputs(len(cross_k)), [*cross_k, *cross_v]))
        kv = self.decoder.kv_loop(cross, kv_shape)  # the cache lives where the decoder runs
        ids = np.full((batch, 1), s.bos_id, np.int64)
        done = np.zeros(batch, bool)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        for _ in range(limit):
            nxt = kv.step(ids).argmax(-1)
            nxt = np.where(done, s.pad_id, nxt)
            for b in np.flatnonzero(~done):
                tokens[b].append(int(nxt[b]))
            done |= nxt == s.eos_id
            if done.all():
                break
            ids = nxt[:, None].astype(np.int64)
        return Captions([self.tokenizer.decode(t) for t in tokens], tokens)

