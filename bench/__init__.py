"""Benchmarks: the gateway's cost against calling a backend directly (``nox -s bench``)."""
