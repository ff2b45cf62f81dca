"""slimlm: make large language models smaller, faster and cheaper, and prove it."""

__version__ = "0.1.0"
