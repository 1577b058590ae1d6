"""Tokenizers from the bundle (Hugging Face `tokenizer.json`, run by the `tokenizers` library)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    file: str
    max_length: int
    pad_id: int
    padding: str  # "longest" or "max_length", as the reference processor pads

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerSpec:
        return cls(**d)


class TextTokenizer:
    def __init__(self, path: Path, spec: TokenizerSpec):
        self.spec = spec
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.enable_truncation(spec.max_length)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> input_ids, attention_mask, both int64 (B, L)."""
        encs = self._tok.encode_batch(texts)
        width = self.spec.max_length if self.spec.padding == "max_length" else max(len(e.ids) for e in encs)
        ids = np.full((len(texts), width), self.spec.pad_id, np.int64)
        mask = np.zeros((len(texts), width), np.int64)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return ids, mask

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True).strip()


class TextTower:
    """A text encoder graph with its tokenizer: texts -> embeddings (one batched run)."""

    def __init__(self, session, tokenizer: TextTokenizer, output: str):
        self.session, self.tokenizer, self.output = session, tokenizer, output

    def __call__(self, texts: list[str]) -> np.ndarray:
        ids, mask = self.tokenizer(texts)
        return self.session.run({"input_ids": ids, "attention_mask": mask})[self.output]
