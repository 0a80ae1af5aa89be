"""A serving coordinator freezes what its start left alive, so full GC pauses stay short; apps
made in-process (tests: many per process) are left alone."""

from __future__ import annotations

import gc
from types import SimpleNamespace

from rma.coordinator.app import create_app
from rma.coordinator.gcpause import FREEZE_FLAG, freeze_after_start
from rma.coordinator.serve import server_config
from rma.settings import CoordinatorSettings


def test_freeze_only_when_asked() -> None:
    before = gc.get_freeze_count()
    assert freeze_after_start(SimpleNamespace()) == 0
    assert gc.get_freeze_count() == before
    try:
        frozen = freeze_after_start(SimpleNamespace(**{FREEZE_FLAG: True}))
        assert frozen > before
    finally:
        gc.unfreeze()


def test_the_server_config_asks_for_it(tmp_path) -> None:
    settings = CoordinatorSettings(data_dir=tmp_path, port=0)
    app = create_app(settings, run_sweeper=False)
    try:
        assert not getattr(app.state, FREEZE_FLAG, False)
        server_config(settings, app, "warning")
        assert getattr(app.state, FREEZE_FLAG) is True
    finally:
        app.state.pool.engine.dispose()
