"""Text generation. For now a streaming wrapper over HF ``generate``."""

from slimlm.generation.stream import generate_text

__all__ = ["generate_text"]
