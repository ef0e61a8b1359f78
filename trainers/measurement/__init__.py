"""Measurement and compilation tools: speed and memory of training, decoding and single operators, causality probes, ahead-of-time compiles for TPU."""
