"""Inference engines behind one `Session` interface."""
