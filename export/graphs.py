"""Export wrappers: each runtime graph as a small torch module over the original modules.

The wrappers reuse the reference models' own layers (no copied weights), so a graph can
only differ from the reference by how it is cut: that is what parity checks measure.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# --- captioner (BLIP) -------------------------------------------------------------------------


class BlipVision(nn.Module):
    def __init__(self, blip):
        super().__init__()
        self.vision = blip.vision_model

    def forward(self, pixel_values):
        return self.vision(pixel_values=pixel_values)[0]


class BlipCrossKV(nn.Module):
    """Cross-attention keys and values of every decoder layer, computed once per image."""

    def __init__(self, blip):
        super().__init__()
        self.layers = blip.text_decoder.bert.encoder.layer
        cfg = blip.config.text_config
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    def forward(self, image_embeds):
        b, s, _ = image_embeds.shape
        ks, vs = [], []
        for layer in self.layers:
            att = layer.crossattention.self
            ks.append(att.key(image_embeds).view(b, s, self.heads, self.head_dim).transpose(1, 2))
            vs.append(att.value(image_embeds).view(b, s, self.heads, self.head_dim).transpose(1, 2))
        return torch.stack(ks), torch.stack(vs)  # (L, B, H, S, Dh) each


def _attend(q, k, v, mask=None):
    """(B, H, T, Dh) queries -> (B, T, H, Dh); the caller flattens the heads."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)


class BlipDecoderStep(nn.Module):
    """One decoding step with a self-attention KV cache; the past may be empty (first step).

    input_ids (B, T), past_kv (L, 2, B, H, P, Dh), then one cross K (B, H, S, Dh) per layer and
    one cross V per layer (`captioner.cross_inputs`)
    -> logits of the last position (B, V), present_kv (L, 2, B, H, P+T, Dh)

    Cross K/V come in per layer because slicing a stacked (L, B, H, S, Dh) input copies it:
    ONNX Runtime's Split of the stacked K/V was a tenth of the decoder's time (docs/performance.md).
    The runtime passes views of the stacked tensors
    that the cross-K/V graph returns, so nothing is copied.

    A step is ~50 small nodes a layer, and each costs ONNX Runtime a few microseconds beyond its
    kernel, so the graph is written for few nodes: hidden states are (B*T, C) rows, which makes
    every Linear one Gemm with its bias fused, and heads are flattened by a constant reshape.
    Same logits to the bit, fewer nodes and less time a token (docs/performance.md).
    """

    def __init__(self, blip):
        super().__init__()
        dec = blip.text_decoder
        self.emb = dec.bert.embeddings
        self.layers = dec.bert.encoder.layer
        self.lm = dec.cls.predictions
        cfg = blip.config.text_config
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        self.width = cfg.hidden_size

    def _split(self, rows, t):
        """(B*T, C) -> (B, H, T, Dh)."""
        return rows.view(-1, t, self.heads, self.head_dim).transpose(1, 2)

    def _rows(self, x):
        """(B, T, H, Dh) or (B, T, C) -> (B*T, C)."""
        return x.reshape(-1, self.width)

    def forward(self, input_ids, past_kv, *cross):
        n = len(self.layers)
        cross_k, cross_v = cross[:n], cross[n:]
        t = input_ids.shape[1]
        p = past_kv.shape[4]
        pos = torch.arange(t, device=input_ids.device) + p
        x = self._rows(self.emb.LayerNorm(self.emb.word_embeddings(input_ids) + self.emb.position_embeddings(pos)[None]))
        # causal over the new positions, everything in the past visible
        allowed = torch.arange(p + t, device=x.device)[None, :] <= pos[:, None]
        mask = torch.where(allowed, 0.0, torch.finfo(x.dtype).min)[None, None]
        presents = []
        for i, layer in enumerate(self.layers):
            sa = layer.attention.self
            k = torch.cat([past_kv[i, 0], self._split(sa.key(x), t)], dim=2)
            v = torch.cat([past_kv[i, 1], self._split(sa.value(x), t)], dim=2)
            presents.append(torch.stack([k, v]))
            x = layer.attention.output(self._rows(_attend(self._split(sa.query(x), t), k, v, mask)), x)
            ca = layer.crossattention.self
            x = layer.crossattention.output(self._rows(_attend(self._split(ca.query(x), t), cross_k[i], cross_v[i])), x)
            x = layer.output(layer.intermediate(x), x)
        return self.lm(x.view(-1, t, self.width)[:, -1]), torch.stack(presents)


# --- detector (OWL-ViT) -----------------------------------------------------------------------


class OwlImage(nn.Module):
    """Image side: everything of the class head that does not need the queries, and the boxes."""

    def __init__(self, owl):
        super().__init__()
        self.owl = owl

    def forward(self, pixel_values):
        fmap = self.owl.image_embedder(pixel_values=pixel_values)[0]
        b, h, w, d = fmap.shape
        feats = fmap.reshape(b, h * w, d)
        boxes = self.owl.box_predictor(feats, fmap)
        head = self.owl.class_head
        ce = head.dense0(feats)
        ce = ce / (torch.linalg.norm(ce, dim=-1, keepdim=True) + 1e-6)
        return ce, head.logit_shift(feats), head.elu(head.logit_scale(feats)) + 1, boxes


class OwlText(nn.Module):
    """Query embeddings as the detector's forward makes them (projected, L2-normalized)."""

    def __init__(self, owl):
        super().__init__()
        self.owl = owl.owlvit

    def forward(self, input_ids, attention_mask):
        pooled = self.owl.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        e = self.owl.text_projection(pooled)
        return e / torch.linalg.norm(e, ord=2, dim=-1, keepdim=True)


class OwlHead(nn.Module):
    """Class logits from image-side outputs and queries (B, Q, D)."""

    def forward(self, class_embeds, logit_shift, logit_scale, query_embeds):
        q = query_embeds / (torch.linalg.norm(query_embeds, dim=-1, keepdim=True) + 1e-6)
        return (torch.einsum("bpd,bqd->bpq", class_embeds, q) + logit_shift) * logit_scale


# --- CLIP -------------------------------------------------------------------------------------


class ClipImage(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.vision, self.proj = clip.vision_model, clip.visual_projection

    def forward(self, pixel_values):
        return self.proj(self.vision(pixel_values=pixel_values).pooler_output)


class ClipText(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.text, self.proj = clip.text_model, clip.text_projection

    def forward(self, input_ids, attention_mask):
        return self.proj(self.text(input_ids=input_ids, attention_mask=attention_mask).pooler_output)
