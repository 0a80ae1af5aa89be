"""The wire format shared by every role (pure pydantic: cheap to import).

The coordinator's database tables live in :mod:`rma.coordinator.tables`; they are built from the
same enums and field names as these models.
"""

from rma.schemas.api import *  # noqa: F403
from rma.schemas.api import __all__ as _api_all
from rma.schemas.enums import ServiceState, Tier, Transport, WorkerStatus

__all__ = [*_api_all, "ServiceState", "Tier", "Transport", "WorkerStatus"]
