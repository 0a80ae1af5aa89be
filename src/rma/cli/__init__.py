"""The ``rma`` command line: thin Typer commands over library code."""
