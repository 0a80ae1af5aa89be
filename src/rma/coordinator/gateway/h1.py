"""The gateway's HTTP/1.1 client, now :mod:`rma._http1` (shared with the agent's tunnel)."""

from rma._http1 import HIGH_WATER, H1Client, H1Error, H1Response, parse_origin

__all__ = ["HIGH_WATER", "H1Client", "H1Error", "H1Response", "parse_origin"]
