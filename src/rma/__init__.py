"""rma: a democratized compute pool for AI services."""

__version__ = "0.1.0"
