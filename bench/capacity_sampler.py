"""A sampling profiler for a Python process, in the process itself (no py-spy needed).

``python bench/capacity_sampler.py OUT.txt -m rma coordinator serve ...`` runs the module with
the given arguments and, every ``RMA_SAMPLE_INTERVAL`` seconds (default 0.002), reads every
thread's stack with ``sys._current_frames()``, and times every garbage collection
(``gc.callbacks``).  At exit it writes OUT.txt: per thread kind (the event loop, the worker
threads) the busy stacks (a thread waiting on a lock, a queue, ``select`` or ``sleep`` is idle),
most frequent first, innermost frame last, the share of the samples each took, and the
collections' count and longest pause.  SIGUSR1 forgets the samples so far and SIGUSR2 writes
OUT.txt and stops (``bench/capacity.py --profile DIR`` runs its coordinators under it, around
the last size's measurement window).  ``bench/sampler.py`` is the tail bench's: wall-clock
stacks and an event-loop stall probe.
"""

from __future__ import annotations

import atexit
import gc
import os
import runpy
import signal
import sys
import threading
import time
from collections import Counter
from types import FrameType

#: Innermost functions that mean "waiting", not working.
IDLE = {
    "wait", "select", "poll", "sleep", "_worker", "accept", "get", "acquire", "run_forever",
    "_run_once", "epoll", "recv", "readinto", "wait_for", "_wait_for_tstate_lock",
}  # fmt: skip


def stack(frame: FrameType | None, depth: int = 30) -> list[str]:
    out = []
    while frame is not None and len(out) < depth:
        code = frame.f_code
        out.append(f"{os.path.basename(code.co_filename)}:{code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return out[::-1]


def main() -> None:
    out_path = sys.argv[1]
    if sys.argv[2] != "-m":
        raise SystemExit("usage: capacity_sampler.py OUT -m MODULE [ARGS...]")
    module = sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    interval = float(os.environ.get("RMA_SAMPLE_INTERVAL", "0.002"))
    counts: Counter[tuple[str, str]] = Counter()
    totals: Counter[str] = Counter()
    main_ident = threading.main_thread().ident
    stop = threading.Event()

    def sample() -> None:
        me = threading.get_ident()
        while not stop.wait(interval):
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                kind = "event loop" if ident == main_ident else "threads"
                totals[kind] += 1
                st = stack(frame)
                inner = st[-1].split(":")[1] if st else ""
                if inner in IDLE or (kind == "event loop" and inner == "run"):  # in uvloop
                    continue
                counts[(kind, " ; ".join(st[-12:]))] += 1

    def write() -> None:
        if stop.is_set():
            return
        stop.set()
        time.sleep(2 * interval)  # the sampler's last pass
        with open(out_path, "w") as f:
            for kind in ("event loop", "threads"):
                total = totals[kind] or 1
                busy = sum(c for (k, _), c in counts.items() if k == kind)
                f.write(f"== {kind}: {totals[kind]} samples, busy {100 * busy / total:.1f} %\n")
                rows = [(c, s) for (k, s), c in counts.items() if k == kind]
                for c, s in sorted(rows, reverse=True)[:40]:
                    f.write(f"{100 * c / total:6.2f} %  {s}\n")
                f.write("\n")
            for gen in (0, 1, 2):
                took = sorted(t for g, t in gc_times if g == gen)
                if took:
                    f.write(
                        f"== gc generation {gen}: {len(took)} collections, "
                        f"longest {took[-1] * 1e3:.1f} ms, total {sum(took) * 1e3:.0f} ms\n"
                    )

    gc_times: list[tuple[int, float]] = []  # (generation, seconds) of each collection
    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gc_times.append((info["generation"], time.perf_counter() - gc_started[0]))

    gc.callbacks.append(on_gc)
    atexit.register(write)

    def on_signal(signum: int, _frame: object) -> None:
        # uvicorn restores this handler after its graceful shutdown and raises the signal again
        write()
        os._exit(128 + signum)

    def on_usr1(_signum: int, _frame: object) -> None:
        counts.clear()  # a measurement starts: forget what came before
        totals.clear()
        gc_times.clear()

    def on_usr2(_signum: int, _frame: object) -> None:
        write()  # it ends: write what it saw

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGUSR2, on_usr2)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=sample, name="sampler", daemon=True).start()
    started = time.monotonic()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.stderr.write(f"sampler: {time.monotonic() - started:.0f} s sampled\n")


if __name__ == "__main__":
    main()
