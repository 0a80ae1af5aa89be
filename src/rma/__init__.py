"""rma: a democratized compute pool for AI services."""

__version__ = "0.1.0"

# The name on the package index; the command and the import are `rma` (the index's `rma` is
# another project).
DISTRIBUTION = "rma-pool"


def install_hint(extra: str | None = None) -> str:
    """The pip line that installs this project, with `extra` if given."""
    return f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install {DISTRIBUTION}"
