"""CLIP image and text towers, and the text-embedding caches around them."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from ..backends.base import Session
from .text import TextTower


class LRUCache:
    """Thread-safe LRU of text -> embedding, with hit/miss counts for profiling."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._d: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def put(self, key: str, value: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)


class Clip:
    def __init__(self, image: Session, text: TextTower, cache_size: int = 4096):
        self.image, self.text = image, text
        self.cache = LRUCache(cache_size)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self.image.run({"pixel_values": pixels})["image_embeds"]

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Embeddings for texts; the tower runs once, batched, on the cache misses only."""
        found = {t: self.cache.get(t) for t in dict.fromkeys(texts)}
        missing = [t for t, v in found.items() if v is None]
        if missing:
            emb = self.text(missing)
            for t, e in zip(missing, emb):
                found[t] = e
                self.cache.put(t, e)
        return np.stack([found[t] for t in texts])
