"""``python -m bench`` (what ``nox -s bench`` runs): the gateway benchmark, see bench/run.py."""

from bench.run import main

raise SystemExit(main())
