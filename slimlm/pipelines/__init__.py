"""Pipelines: work that spans compression, generation and measurement, above all of them.

``compress`` (load -> calibrate -> apply a recipe -> save -> evaluate), lazy
compression of models larger than memory, and compressed drafts for
speculative decoding. Nothing below this package imports it.
"""
