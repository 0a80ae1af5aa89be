"""Developer sessions: ``nox -s tests lint typecheck bench chaos``."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PY = "3.11"


LOCK = "requirements/lock.txt"
#: llama.cpp built for a portable x86-64 CPU (docs/development.md).
CMAKE_ARGS = (
    "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
)


def _install(session: nox.Session, extras: str = "all,dev") -> None:
    """The project with ``extras``, every dependency at its version in the lock."""
    session.install("-c", LOCK, "-e", f".[{extras}]", env={"CMAKE_ARGS": CMAKE_ARGS})
    session.install("--no-deps", "-r", "requirements/no-deps.txt")


@nox.session(python=PY)
def tests(session: nox.Session) -> None:
    """The test suite (the same command CI runs)."""
    _install(session)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PY)
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "bench", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "bench", "noxfile.py")


@nox.session(python=PY)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src/."""
    _install(session, "postgres,redis,docker,gpu,dev")
    session.run("mypy")


@nox.session(python=PY)
def bench(session: nox.Session) -> None:
    """Gateway benchmarks (docs/benchmarks.md): ``nox -s bench -- --quick`` for a short run."""
    _install(session, "dev")
    session.run("python", "-m", "bench", *session.posargs)


@nox.session(python=PY)
def capacity(session: nox.Session) -> None:
    """Capacity benchmark (docs/benchmarks.md): simulated workers heartbeating against one
    coordinator or two; ``nox -s capacity -- --sizes 10,1000 --interval 5`` for a short run.
    Set ``RMA_BENCH_DATABASE_URL`` for the PostgreSQL setups."""
    _install(session, "postgres,dev")
    session.run("python", "-m", "bench.capacity", *session.posargs)


@nox.session(python=PY)
def lock(session: nox.Session) -> None:
    """Refresh requirements/lock.txt: every dependency of ``.[all,dev]``, direct and transitive.

    ``nox -s lock`` keeps the pins that still satisfy pyproject.toml; ``nox -s lock -- --upgrade``
    (or ``--upgrade-package NAME``) moves them.  Review the diff like code: CI installs exactly it.
    """
    session.install("pip-tools>=7.4")
    session.run(
        "pip-compile",
        "--quiet",
        "--allow-unsafe",
        "--strip-extras",
        "--no-emit-index-url",
        "--no-emit-find-links",
        *(f"--extra={extra}" for extra in ("postgres", "redis", "docker", "gpu", "local", "dev")),
        "--output-file",
        LOCK,
        "pyproject.toml",
        *session.posargs,
        env={"CUSTOM_COMPILE_COMMAND": "nox -s lock"},
    )


@nox.session(python=PY)
def chaos(session: nox.Session) -> None:
    """Chaos experiments at full scale (docs/reliability.md); the figures go to
    ``bench/chaos-results.jsonl``.  Set ``RMA_TEST_DATABASE_URL`` for PostgreSQL."""
    _install(session, "dev")
    session.run(
        "python",
        "-m",
        "pytest",
        "tests/chaos",
        "-m",
        "chaos",
        "-s",
        "-q",
        "--timeout",
        "1800",
        *session.posargs,
        env={"RMA_CHAOS_SCALE": "full", "RMA_CHAOS_RESULTS": "bench/chaos-results.jsonl"},
    )
