"""Per-worker verification rate and reputation, BOINC-style adaptive replication.

A new worker's answers are verified at ``verify_rate_new`` until it has ``verify_new_results``
consecutive agreements; then the rate decays by ``verify_decay`` per further agreement, down to
``verify_rate_floor``.  One disagreement resets the run.  The reputation is the share of
agreements among verified results, Laplace-smoothed: ``(verified - disagreements + 1) /
(verified + 2)`` (0.5 for a new worker, towards 1 for an honest one, towards 0 for a liar).
"""

from __future__ import annotations

from rma.coordinator.registry import WorkerState
from rma.settings import CoordinatorSettings


def chance(worker: WorkerState, settings: CoordinatorSettings) -> float:
    """The probability that this worker's next answer is verified."""
    streak = worker.verify_streak
    new = settings.verify_new_results
    if streak < new:
        return settings.verify_rate_new
    rate = settings.verify_rate_new * settings.verify_decay ** (streak - new + 1)
    return max(settings.verify_rate_floor, min(rate, settings.verify_rate_new))


def agreed(worker: WorkerState) -> None:
    """One verified result that agreed (call under the registry lock)."""
    worker.verified += 1
    worker.verify_streak += 1


def disagreed(worker: WorkerState) -> None:
    """One verified result found wrong (call under the registry lock)."""
    worker.verified += 1
    worker.disagreements += 1
    worker.verify_streak = 0


def should_quarantine(worker: WorkerState, settings: CoordinatorSettings) -> bool:
    return (
        not worker.quarantined
        and not worker.trusted
        and settings.quarantine_threshold > 0
        and worker.verified >= settings.quarantine_min_verified
        and worker.reputation < settings.quarantine_threshold
    )
