"""The dashboard's panes: one widget per tab, each with its own ``compose`` and ``show``."""
