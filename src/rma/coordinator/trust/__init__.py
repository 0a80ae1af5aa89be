"""Trust in results: comparators per kind, verification off the client's path, reputation and
quarantine (``docs/trust.md``)."""
