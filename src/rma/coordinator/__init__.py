"""The coordinator: registry, scheduler, gateway, sweeper and admin API (FastAPI + SQLModel)."""
