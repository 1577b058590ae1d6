"""OWL-ViT open-vocabulary detector: image side, text queries, class head, best box per word."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backends.base import Session


@dataclass(frozen=True)
class Detection:
    word: str
    found: bool
    score: float  # sigmoid score of the best box labelled with the word (or of any box, if not found)
    box: tuple[float, float, float, float] | None  # xyxy pixels of the original image


class Detector:
    """Queries come from the bundle's word bank (built at export with the text tower)."""

    def __init__(self, image: Session, head: Session):
        self.image, self.head = image, head

    def encode_image(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return self.image.run({"pixel_values": pixels})

    def logits(self, image_out: dict[str, np.ndarray], queries: np.ndarray) -> np.ndarray:
        """queries (B, Q, D) -> class logits (B, P, Q)."""
        feeds = {k: image_out[k] for k in ("class_embeds", "logit_shift", "logit_scale")}
        return self.head.run({**feeds, "query_embeds": queries})["logits"]

    @staticmethod
    def decode(
        logits: np.ndarray, boxes: np.ndarray, words: list[str], size: tuple[int, int], threshold: float
    ) -> list[Detection]:
        """One image: logits (P, Q>=len(words)), boxes (P, 4) cxcywh in [0, 1], size (w, h).

        Like the detector's own post-processing, each box takes its best word; a word is
        found when a box labelled with it scores above the threshold, and takes the best one
        (ranked by logit: sigmoid scores saturate and would tie).
        """
        q = len(words)
        if q == 0:
            return []
        logits = logits[:, :q]
        labels = logits.argmax(-1)
        best_logit = logits.max(-1)
        scores = _sigmoid(best_logit)
        w, h = size
        cx, cy, bw, bh = boxes.T
        xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * np.array([w, h, w, h], np.float32)
        out = []
        for j, word in enumerate(words):
            mine = np.flatnonzero((labels == j) & (scores > threshold))
            if mine.size:
                best = mine[best_logit[mine].argmax()]
                out.append(Detection(word, True, float(scores[best]), tuple(float(v) for v in xyxy[best])))
            else:
                out.append(Detection(word, False, float(_sigmoid(logits[:, j].max())), None))
        return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))  # no overflow for large |x|
