"""The scheduler: where each catalog service runs (placement) and the loop that keeps it so.

Modelled on Nomad's scheduler: :mod:`.feasible` filters the workers a service may run on,
:mod:`.rank` orders services and candidate workers, :mod:`.reconcile` diffs the desired placement
against the current one.  All three are pure functions of plain values (no database, no clock,
no I/O), tested on their own; :mod:`.loop` applies a plan to the coordinator's registry.
"""

from rma.coordinator.scheduler.feasible import Node, Room, fits
from rma.coordinator.scheduler.reconcile import Change, Placement, Plan, plan

__all__ = ["Change", "Node", "Placement", "Plan", "Room", "fits", "plan"]
