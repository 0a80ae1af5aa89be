"""Snapshot tests of the dashboard's main screens at 80x24 and 160x48.

These are *rendering* tests: the app is fed a fixed dataset through a client stub
(``tui_stub.StubClient``, the same async methods as ``CoordinatorClient``) with the clock frozen,
so the pictures are the same on every run.  The real path (a real coordinator, real workers) is
covered by the Pilot tests in ``test_live.py``.

Update after an intended change: ``pytest tests/tui/test_snapshots.py --snapshot-update``, then
look at the SVGs in ``__snapshots__/`` before committing them.
"""

from __future__ import annotations

import pytest

from .tui_stub import make_app, settle, settle_credits


@pytest.fixture(autouse=True)
def _colour(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite sets NO_COLOR; these pictures are about colour too."""
    monkeypatch.delenv("NO_COLOR", raising=False)


SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((160, 48), id="160x48")]


@pytest.mark.parametrize("size", SIZES)
def test_workers(snap_compare, size):
    """The workers table with the first worker's detail (below at 80, beside at 160)."""
    assert snap_compare(make_app(), terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", SIZES)
def test_workers_filtered_and_sorted(snap_compare, size):
    """Filter ``zone=eu`` and sort by CPU, highest first."""
    assert snap_compare(
        make_app(),
        press=["slash", *"zone=eu", "enter", "s", "s", "s", "s", "S"],
        terminal_size=size,
        run_before=settle,
    )


@pytest.mark.parametrize("size", SIZES)
def test_pool_health(snap_compare, size):
    """Workers by status and tier; each service's healthy replicas against the catalog's want."""
    assert snap_compare(make_app(), press=["2"], terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", SIZES)
def test_load_plots(snap_compare, size):
    """Requests/s, latency, errors per service and load per worker over the last 5 minutes."""
    assert snap_compare(make_app(), press=["3"], terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", SIZES)
def test_events(snap_compare, size):
    """The event log, newest first."""
    assert snap_compare(make_app(), press=["4"], terminal_size=size, run_before=settle)


def test_tokens(snap_compare):
    """Join tokens with their status."""
    assert snap_compare(make_app(), press=["5"], terminal_size=(80, 24), run_before=settle)


@pytest.mark.parametrize("size", SIZES)
def test_services(snap_compare, size):
    """The scheduler's services: wanted / assigned / healthy, in flight, queued, last scaling."""
    assert snap_compare(make_app(), press=["6"], terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", SIZES)
def test_credits(snap_compare, size):
    """The ledger per owner: workers, quarantined ones, credits and their share, escrow."""
    assert snap_compare(make_app(), terminal_size=size, run_before=settle_credits)


def test_confirm_unquarantine(snap_compare):
    """``k`` on a quarantined worker (the REP column says QUAR) asks to let it back."""
    assert snap_compare(make_app(), press=["k"], terminal_size=(80, 24), run_before=settle)


def test_confirm_drain(snap_compare):
    """Drain asks first."""
    assert snap_compare(make_app(), press=["down", "d"], terminal_size=(80, 24), run_before=settle)


def test_help(snap_compare):
    """``?`` shows the keys."""
    assert snap_compare(
        make_app(), press=["question_mark"], terminal_size=(80, 24), run_before=settle
    )
