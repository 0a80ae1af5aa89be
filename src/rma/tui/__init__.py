"""``rma admin top``: the live dashboard, a Textual app over the admin API.

Textual is imported only inside :func:`run_top`, so importing this package stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rma.client import CoordinatorClient

__all__ = ["run_top"]


def run_top(client_factory: Callable[[], CoordinatorClient], refresh: float = 2.0) -> None:
    """Run the dashboard until the operator quits.

    Raises :class:`rma.client.RmaError` when it cannot work at all (no or a wrong admin key);
    a coordinator that is down or goes away is shown in the app and retried, never raised.
    """
    from rma.tui.app import TopApp

    app = TopApp(client_factory, refresh=refresh)
    app.run()
    if app.fatal is not None:
        raise app.fatal
