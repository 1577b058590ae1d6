"""The PyTorch reference chain: the same stages on the original modules and processors.

Ground truth for parity (HF `generate(do_sample=False, num_beams=1)`, the detector's own
post-processing, the reference image processors) and the baseline for benchmarks.
Only the pieces that have no reference implementation are shared with the runtime:
image decoding, object words, cropping and the feature recipe.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from itemrt.stages.images import crop_box
from itemrt.stages.recipe import Pairs, recipe
from itemrt.stages.words import Vocabulary
from PIL import Image

from .head import MLPHead, load_head
from .models import Models, Source, load_models


@dataclass
class ReferenceResult:
    caption: str
    tokens: list[int]
    words: list[str]
    found: list[bool]
    scores: list[float]
    boxes: list[tuple[float, float, float, float] | None]
    image_embeds: np.ndarray  # [I0, crops of found words]
    text_embeds: np.ndarray  # [caption, found words]
    p_fake: float
    pairs: Pairs  # what the head read: kept so a later head can be checked on the same inputs
    timings_ms: dict[str, float] = field(default_factory=dict)
    gpu_ms: dict[str, float] = field(default_factory=dict)  # CUDA-event time per stage, on a GPU only


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projection
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ReferenceChain:
    def __init__(
        self,
        models: Models,
        head: MLPHead,
        vocabulary: Vocabulary,
        *,
        recipe_name: str,
        max_objects: int,
        max_new_tokens: int,
        det_threshold: float,
        query_template: str,
        word_template: str,
    ):
        self.m, self.head, self.vocabulary = models, head, vocabulary
        self.features, _ = recipe(recipe_name)
        self.max_objects, self.max_new_tokens = max_objects, max_new_tokens
        self.det_threshold = det_threshold
        self.query_template, self.word_template = query_template, word_template
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def to(self, device: str, dtype: torch.dtype = torch.float32) -> ReferenceChain:
        """Run the three models on `device` in `dtype` (the baseline a GPU user would otherwise
        use: eager PyTorch on CUDA, FP32 or FP16). The head stays FP32 on the CPU."""
        self.device, self.dtype = torch.device(device), dtype
        for model in (self.m.blip, self.m.owl, self.m.clip):
            model.to(device=self.device, dtype=dtype)
        return self

    @torch.no_grad()
    def run(
        self, img: Image.Image, *, max_new_tokens: int | None = None, words: list[str] | None = None
    ) -> ReferenceResult:
        m, t, gpu = self.m, {}, {}
        cuda = self.device.type == "cuda"
        marks = [torch.cuda.Event(enable_timing=True)] if cuda else []
        if cuda:
            marks[0].record()

        def tick(name, t0):
            if cuda:  # stage wall times include the GPU work they queued; events time it on the device
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()
                torch.cuda.synchronize(self.device)
                gpu[name] = marks[-2].elapsed_time(marks[-1])
            t[name] = (time.perf_counter() - t0) * 1e3
            return time.perf_counter()

        t0 = time.perf_counter()
        px = self._pixels(m.blip_processor(img, return_tensors="pt")["pixel_values"])
        limit = max_new_tokens or self.max_new_tokens
        out = m.blip.generate(pixel_values=px, do_sample=False, num_beams=1, max_new_tokens=limit).cpu()
        caption = m.blip_tokenizer.decode(out[0], skip_special_tokens=True).strip()
        tokens = _strip(out[0, 1:].tolist(), m.blip.config.text_config.sep_token_id)
        t0 = tick("captioner", t0)

        words = self.vocabulary.extract(caption, self.max_objects) if words is None else list(words)
        found, scores, boxes = self._detect(img, words)
        t0 = tick("detector", t0)

        crops = [crop_box(img, b) for b in boxes if b is not None]
        ipx = self._pixels(m.clip_processor([img, *crops], return_tensors="pt")["pixel_values"])
        image_embeds = _numpy(_features(m.clip.get_image_features(pixel_values=ipx)))
        texts = [caption] + [self.word_template.format(w) for w, f in zip(words, found) if f]
        tok = m.clip_tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        text_embeds = _numpy(_features(
            m.clip.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        ))
        t0 = tick("clip", t0)

        pairs = Pairs(
            image_embeds[0], text_embeds[0], image_embeds[1:], text_embeds[1:],
            np.asarray(scores, np.float32), self.max_objects,
        )
        feats = torch.from_numpy(self.features(pairs)[None])
        p = float(self.head(feats)[0])
        tick("head", t0)
        t["total"] = sum(t.values())
        return ReferenceResult(caption, tokens, words, found, scores, boxes, image_embeds, text_embeds, p, pairs, t, gpu)

    def _pixels(self, px: torch.Tensor) -> torch.Tensor:
        return px.to(device=self.device, dtype=self.dtype)

    def _detect(self, img: Image.Image, words: list[str]):
        if not words:
            return [], [], []
        m = self.m
        q = m.owl_tokenizer([self.query_template.format(w) for w in words], padding="max_length", return_tensors="pt")
        q = q.to(self.device)
        px = self._pixels(m.owl_processor(img, return_tensors="pt")["pixel_values"])
        raw = m.owl(input_ids=q["input_ids"], attention_mask=q["attention_mask"], pixel_values=px)
        # Post-processing on the CPU in FP32, whatever the models ran in.
        out = SimpleNamespace(logits=raw.logits.float().cpu(), pred_boxes=raw.pred_boxes.float().cpu())
        w, h = img.size
        det = m.owl_processor.post_process_object_detection(out, threshold=self.det_threshold, target_sizes=[(h, w)])[0]
        probs = torch.sigmoid(out.logits[0])  # (P, Q)
        best_logit = out.logits[0].max(-1).values
        kept_logit = best_logit[torch.sigmoid(best_logit) > self.det_threshold]  # the boxes `det` kept, in order
        found, scores, boxes = [], [], []
        for j in range(len(words)):
            mine = det["labels"] == j
            if mine.any():
                k = int(kept_logit[mine].argmax())  # by logit: saturated sigmoid scores would tie
                found.append(True)
                scores.append(float(det["scores"][mine][k]))
                boxes.append(tuple(float(v) for v in det["boxes"][mine][k]))
            else:
                found.append(False)
                scores.append(float(probs[:, j].max()))
                boxes.append(None)
        return found, scores, boxes


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.float().cpu().numpy()


def _strip(ids: list[int], eos: int) -> list[int]:
    """Generated ids up to and including end-of-sentence (padding after it dropped)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def reference_for_bundle(root: Path, models: Models | None = None) -> ReferenceChain:
    """The reference chain with exactly the settings (and head) a bundle was exported with."""
    m = json.loads((Path(root) / "manifest.json").read_text())
    if models is None:
        models = load_models({k: Source.from_dict(s) for k, s in m["sources"].items()}, progress=lambda msg: None)
    return ReferenceChain(
        models,
        load_head(Path(root) / m["head"]["weights"], m["head"]),
        Vocabulary.load(Path(root) / m["words"]["vocabulary"]),
        recipe_name=m["head"]["recipe"],
        max_objects=m["words"]["max_objects"],
        max_new_tokens=m["captioner"]["decoding"]["max_new_tokens"],
        det_threshold=m["detector"]["threshold"],
        query_template=m["detector"]["query_template"],
        word_template=m["clip"]["word_template"],
    )
