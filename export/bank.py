"""The word bank: every vocabulary word through the exported CLIP and detector text graphs.

The runtime never runs a text tower on object words: it looks their embeddings up in
bank.npz, so the bank holds exactly what the bundle's own graphs give. A spread of rows is
checked against the PyTorch towers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from itemrt.backends.ort import OrtSession, SessionOptions
from itemrt.progress import Progress
from itemrt.schema import Clip, Detector, Words
from itemrt.stages.text import TextTokenizer, TextTower, TokenizerSpec
from itemrt.stages.words import Vocabulary

from . import graphs
from .models import Models
from .parity import compare

# Words per text-graph call. The attention mask hides the padding, so a word's embedding does
# not depend on its batch beyond float noise; a fixed size keeps a bundle's bank reproducible
# to the bit, and bounds the memory of a vocabulary of thousands of words.
BATCH = 64


def build_bank(root: Path, words: Words, detector: Detector, clip: Clip, progress: Callable[[str], None]) -> dict[str, np.ndarray]:
    """Embed the vocabulary with the exported graphs into `words.bank`; returns the arrays."""
    opts = SessionOptions()
    objects = Vocabulary.load(root / words.vocabulary).objects

    def tower(name: str, spec: TokenizerSpec, output: str) -> TextTower:
        session = OrtSession(root / f"{name}.onnx", name, opts)
        if isinstance(session.shapes["input_ids"][1], str):
            # Both text towers are causal and pool at the end-of-text token, so what follows it
            # (padding) changes nothing: pad to the batch's longest, not the processor's fixed length.
            spec = replace(spec, padding="longest")
        return TextTower(session, TextTokenizer(root / spec.file, spec), output)

    det = tower("detector_text", detector.tokenizer, "query_embeds")
    text = tower("clip_text", clip.tokenizer, "text_embeds")
    # words of a token length together: little padding in any batch; rows go back to vocabulary order
    _, mask = text.tokenizer([clip.word_template.format(w) for w in objects])
    order = sorted(range(len(objects)), key=lambda i: (int(mask[i].sum()), i))
    bar = Progress("word bank", len(objects), progress)
    clip_rows, det_rows = [], []
    for first in range(0, len(order), BATCH):
        batch = [objects[i] for i in order[first : first + BATCH]]
        clip_rows.append(text([clip.word_template.format(w) for w in batch]))
        det_rows.append(det([detector.query_template.format(w) for w in batch]))
        bar.update(len(batch))
    back = np.argsort(order)
    bank = {"words": np.asarray(objects), "clip": np.concatenate(clip_rows)[back],
            "detector": np.concatenate(det_rows)[back]}
    np.savez(root / words.bank, **bank)
    return bank


@torch.no_grad()
def bank_parity(m: Models, bank: dict[str, np.ndarray], detector: Detector, clip: Clip) -> dict:
    """A spread of bank rows against the original text towers."""
    idx = np.linspace(0, len(bank["words"]) - 1, 16).astype(int)
    words = [str(bank["words"][i]) for i in idx]
    t = m.clip_tokenizer([clip.word_template.format(w) for w in words], padding=True, return_tensors="pt")
    out = m.clip.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    clip_ref = (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()
    q = m.owl_tokenizer([detector.query_template.format(w) for w in words], padding="max_length", return_tensors="pt")
    det_ref = graphs.OwlText(m.owl)(q["input_ids"], q["attention_mask"]).numpy()
    return {
        "words_checked": len(words),
        "clip": compare(clip_ref, bank["clip"][idx]),
        "detector": compare(det_ref, bank["detector"][idx]),
    }
