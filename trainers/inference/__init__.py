"""Inference: generation with a decode cache."""
