"""The client-facing gateway: OpenAI-compatible routes, worker choice, failover, streaming."""
