"""The chain's stages: image decoding and preprocessing, the captioner, the object words, the
detector, CLIP and the feature recipe. Each runs on any `Session` (see `itemrt.backends`)."""
