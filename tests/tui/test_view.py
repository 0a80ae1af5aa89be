"""The dashboard's data shaping (no Textual): filtering, sorting, health, queue depth, history."""

from __future__ import annotations

from datetime import timedelta

import pytest

from rma.tui import view
from rma.tui.history import History

from .tui_stub import NOW, STATS, WORKERS


def names(workers):
    return [w.name for w in workers]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ["gamer-pc", "gpu-box-01", "homeserver", "laptop-ana", "pi-cluster-3", "old-nuc"]),
        ("status:offline", ["pi-cluster-3"]),
        ("tier:gpu", ["gamer-pc", "gpu-box-01"]),
        ("service:rag", ["homeserver"]),
        ("label:zone=eu", ["gpu-box-01", "homeserver"]),
        ("zone=eu online", ["gpu-box-01"]),
        ("transport:direct", ["laptop-ana"]),
        ("GPU-BOX", ["gpu-box-01"]),
        ("trust:quarantined", ["gamer-pc"]),
        ("quarantined", ["gamer-pc"]),
        ("nothing-like-this", []),
    ],
)
def test_filter(query, expected):
    got = view.filter_workers(WORKERS, query)
    assert sorted(names(got)) == sorted(expected)


def test_sort_by_each_column_and_reverse():
    by_cpu = view.sort_workers(WORKERS, "cpu", reverse=True)
    assert names(by_cpu)[:2] == ["homeserver", "gpu-box-01"]
    by_status = view.sort_workers(WORKERS, "status")
    assert [w.status.value for w in by_status][0] == "online"
    assert [w.status.value for w in by_status][-1] == "removed"
    freshest = view.sort_workers(WORKERS, "heartbeat")
    assert freshest[0].name == "laptop-ana"  # 2 s ago
    by_rep = view.sort_workers(WORKERS, "rep")
    assert by_rep[0].name == "gamer-pc"  # quarantined first, then the lowest reputation
    assert names(by_rep)[-1] == "gpu-box-01"  # 0.97
    for key in view.SORT_KEYS:
        assert len(view.sort_workers(WORKERS, key)) == len(WORKERS)
    with pytest.raises(ValueError, match="cannot sort by"):
        view.sort_workers(WORKERS, "colour")


def test_service_health_against_the_catalog():
    health = {h.name: h for h in view.service_health(STATS)}
    assert health["llm"].state == "degraded"  # 1 healthy, 2 wanted
    assert health["ollama"].state == "down"  # assigned, none healthy
    assert health["vllm"].state == "ok"
    assert health["redis"].state == "down"  # wanted 1, none
    assert health["vllm"].queued == 4
    assert health["ocr"].queued is None  # not reported: shown as "-"


@pytest.mark.parametrize(
    ("stats", "expected"),
    [
        ({}, {}),
        ({"services": [{"name": "llm", "queued": 3}]}, {"llm": 3}),
        ({"usage": {"by_service": [{"service": "llm", "queue_depth": 2}]}}, {"llm": 2}),
        ({"queue": {"depth": 5, "by_service": {"llm": 5}}}, {"llm": 5}),
        ({"queue": {"llm": {"depth": 1}}}, {"llm": 1}),
        ({"queue": [{"service": "ocr", "depth": 7}]}, {}),  # a bare list at top: not understood
    ],
)
def test_queue_depth_is_read_wherever_it_is_and_absence_is_fine(stats, expected):
    assert view.queue_depths(stats) == expected


def test_total_queued():
    assert view.total_queued({}) is None
    assert view.total_queued({"queue": {"depth": 9}}) == 9
    assert view.total_queued(STATS) == 4


def test_age_and_clock_time_use_the_given_now():
    assert view.age(NOW - timedelta(seconds=4), NOW) == "4s"
    assert view.age(NOW - timedelta(minutes=3, seconds=10), NOW) == "3m"
    assert view.age(NOW - timedelta(hours=2, minutes=30), NOW) == "2.5h"
    assert view.age(None, NOW) == "never"
    assert view.clock_time(NOW - timedelta(minutes=1), NOW) == "11:59:00"
    assert view.clock_time(NOW - timedelta(days=2), NOW) == "30 May 12:00"


def test_spark_and_bar():
    assert view.spark([0, 50, 100], 10, top=100) == "▁▅█"
    assert view.spark([1, 2, 3, 4], 2) == "▆█"  # the newest values
    assert view.spark([], 5) == ""
    assert view.bar(50, 4) == "██░░"
    assert view.bar(None, 3) == "···"


def test_history_turns_counters_into_rates_and_keeps_a_window():
    h = History(window=60)
    stats = {"usage": {"by_service": [{"service": "llm", "requests": 100, "errors": 0}]}}
    h.record(1000.0, stats, WORKERS)
    assert h.values("service", "llm", "rps") == []  # one sighting is no rate yet
    stats["usage"]["by_service"][0].update(requests=130, errors=2, p95_ms=250)
    h.record(1010.0, stats, WORKERS)
    assert h.values("service", "llm", "rps") == [3.0]
    assert h.values("service", "llm", "eps") == [0.2]
    assert h.values("service", "llm", "p95") == [250.0]
    # a counter that went down (coordinator restart) starts over, no negative rate
    stats["usage"]["by_service"][0].update(requests=5)
    h.record(1020.0, stats, WORKERS)
    assert h.values("service", "llm", "rps") == [3.0]
    # only live workers are plotted; old points fall out of the window
    assert h.names("worker", "cpu") == sorted(
        w.id for w in WORKERS if w.status.value in ("online", "draining")
    )
    h.record(1100.0, {}, WORKERS)
    assert h.get("pool", "all", "inflight").times() == [1100.0]


def test_data_services_no_worker_was_given_are_not_placed_not_down():
    rows = view.service_health(
        {
            "services": [
                {"name": "llm", "kind": "openai", "wanted": 0, "assigned": 1, "healthy": 1},
                {"name": "redis", "kind": "tcp", "wanted": 1, "assigned": 0, "healthy": 0},
                {"name": "postgres", "kind": "tcp", "wanted": 1, "assigned": 1, "healthy": 0},
                {"name": "chromadb", "kind": "tcp", "wanted": 1, "assigned": 0, "healthy": 0},
            ]
        }
    )
    shown, unplaced = view.placed_services(rows)
    assert [h.name for h in shown] == ["llm", "postgres"]  # postgres was placed: it is down
    assert unplaced == ["chromadb", "redis"]


def test_cut_cells_end_with_an_ellipsis():
    from rich.text import Text

    from rma.tui.app import _fit

    assert _fit(Text("vllm✓ embeddings✓"), 15).plain == "vllm✓ embeddin…"
    assert _fit(Text("llm✓"), 15).plain == "llm✓"
    assert _fit(Text("anything at all"), None).plain == "anything at all"


async def test_ctrl_c_quits_as_the_help_says():
    from .tui_stub import make_app, settle

    app = make_app()
    async with app.run_test() as pilot:
        await settle(pilot)
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert app.return_code == 0


def test_reputation_cell_marks_quarantine_in_text_and_colour():
    by_name = {w.name: w for w in WORKERS}
    liar, honest, new = by_name["gamer-pc"], by_name["gpu-box-01"], by_name["laptop-ana"]
    assert view.reputation_text(liar) == "0.21 Q"
    assert view.reputation_text(liar, narrow=True) == "QUAR"
    assert "red" in view.reputation_style(liar)
    assert view.reputation_text(honest) == "0.97"
    assert view.reputation_style(honest) == "green"
    assert view.reputation_style(new) == "bright_black"  # nothing verified yet
