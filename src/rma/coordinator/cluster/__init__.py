"""What several coordinators on one PostgreSQL database share: leadership and change notices.

- :mod:`.leader`: one leader per pool (a PostgreSQL advisory lock), which alone sweeps and runs
  the scheduler's periodic and scaling passes;
- :mod:`.changes`: the notices a write sends (``NOTIFY`` in the write's transaction) and how a
  coordinator applies the others' to its routing table;
- :mod:`.node`: the thread that holds the dedicated connection for both.

On SQLite there is one coordinator: :class:`~.node.Solo` is always the leader and sends nothing.
"""

from rma.coordinator.cluster.node import Cluster, Node, Solo, make_cluster

__all__ = ["Cluster", "Node", "Solo", "make_cluster"]
