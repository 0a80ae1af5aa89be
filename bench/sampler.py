"""A wall-clock stack sampler for a Python process (py-spy is not available here).

``python bench/sampler.py OUT.txt [--interval 0.005] -- -m rma coordinator serve ...`` runs the
module like ``python -m``, with a thread that every ``interval`` seconds reads every other
thread's stack (``sys._current_frames``).  At exit it writes to OUT.txt, per thread kind (the
event loop, the usage writer, other threads), the share of samples in which each function was on
the stack (inclusive) and at the top of it (exclusive), plus the whole stacks collapsed
(``a;b;c count``, the input of flame graph tools).  Samples where the event loop's thread waits
in its selector are idle, counted apart.

The sampler's own thread takes the GIL to read the stacks, so it slows the process a little
(about 1 % at 5 ms); use it to find where the time goes, not for figures.
"""

from __future__ import annotations

import atexit
import collections
import gc
import runpy
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

_IDLE = ("select", "poll", "epoll", "run_once", "_run_once")


def _stack(frame: FrameType | None) -> list[str]:
    out = []
    while frame is not None:
        code = frame.f_code
        out.append(f"{code.co_name} ({Path(code.co_filename).name}:{code.co_firstlineno})")
        frame = frame.f_back
    out.reverse()
    return out


class LoopProbe:
    """Loop stalls: a callback on the event loop every millisecond stamps the time; a watchdog
    thread reads the loop thread's stack while a stamp is overdue by ``threshold`` seconds,
    and the gaps between stamps are kept (the stall durations).  GC pauses are timed too."""

    def __init__(self, threshold: float = 0.015) -> None:
        self.threshold = threshold
        self.last = time.perf_counter()
        self.gaps: list[float] = []
        self.split: list[tuple[float, float, float]] = []
        self.stall_stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.gc: dict[int, list[float]] = collections.defaultdict(list)
        self._gc_start = 0.0
        self._stop = threading.Event()

    def attach(self, loop: object) -> None:
        cpu = [time.thread_time(), time.process_time()]

        def tick() -> None:
            now = time.perf_counter()
            gap = now - self.last
            mine, everyone = time.thread_time(), time.process_time()
            if gap > 0.005:
                self.gaps.append(gap)
                # where the gap went: the loop's own CPU, other threads' CPU, or neither (the
                # process was not running: the machine's other load)
                loop_cpu = mine - cpu[0]
                self.split.append((gap, loop_cpu, max(everyone - cpu[1] - loop_cpu, 0.0)))
            cpu[0], cpu[1] = mine, everyone
            self.last = now
            loop.call_later(0.001, tick)  # type: ignore[attr-defined]

        self.last = time.perf_counter()
        loop.call_soon(tick)  # type: ignore[attr-defined]
        threading.Thread(target=self._watch, name="bench-watchdog", daemon=True).start()
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc[info["generation"]].append(time.perf_counter() - self._gc_start)

    def _watch(self) -> None:
        main = threading.main_thread().ident
        while not self._stop.wait(0.002):
            if time.perf_counter() - self.last > self.threshold:
                frame = sys._current_frames().get(main)  # type: ignore[arg-type]
                self.stall_stacks[tuple(_stack(frame))] += 1

    def report(self) -> list[str]:
        self._stop.set()
        lines = ["\n== loop stalls (gaps between 1 ms ticks over 5 ms)"]
        gaps = sorted(self.gaps, reverse=True)
        for lo in (0.005, 0.010, 0.020, 0.050, 0.100):
            lines.append(f"gaps > {lo * 1000:g} ms: {sum(g > lo for g in gaps)}")
        lines.append("longest: " + ", ".join(f"{g * 1000:.1f}" for g in gaps[:20]))
        long = [x for x in self.split if x[0] > 0.010]
        wall = sum(g for g, _, _ in long)
        if wall:
            own = sum(c for _, c, _ in long)
            others = sum(o for _, _, o in long)
            lines.append(
                f"gaps over 10 ms: {len(long)}, {wall * 1000:.0f} ms in all: the loop's CPU "
                f"{own / wall:.0%}, other threads' CPU {others / wall:.0%}, "
                f"not running {max(1 - (own + others) / wall, 0):.0%}"
            )
        for g, c, o in sorted(long, reverse=True)[:12]:
            lines.append(
                f"  {g * 1000:6.1f} ms: loop CPU {c * 1000:5.1f}, other threads {o * 1000:5.1f}"
            )
        for gen, pauses in sorted(self.gc.items()):
            pauses.sort(reverse=True)
            total = sum(pauses)
            top = ", ".join(f"{p * 1000:.1f}" for p in pauses[:10])
            lines.append(f"gc gen{gen}: {len(pauses)} runs, {total * 1000:.0f} ms, longest {top}")
        lines.append(f"-- loop thread stacks while a tick was {self.threshold * 1000:g} ms late")
        for stack, n in self.stall_stacks.most_common(25):
            lines.append(f"{n:5d}  " + " <- ".join(reversed(stack[-14:])))
        return lines


PROBE = LoopProbe()


def _patch_uvicorn() -> None:
    import uvicorn

    startup = uvicorn.Server.startup

    async def probed(self: object, sockets: object = None) -> None:
        import asyncio

        PROBE.attach(asyncio.get_running_loop())
        await startup(self, sockets)  # type: ignore[arg-type]

    uvicorn.Server.startup = probed  # type: ignore[method-assign]


class Sampler:
    def __init__(self, out: Path, interval: float) -> None:
        self.out = out
        self.interval = interval
        self.stacks: collections.Counter[tuple[str, tuple[str, ...]]] = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()
        atexit.register(self.write)
        # uvicorn re-raises a captured SIGTERM after its shutdown, under the handler it found:
        # this one, so the report is written before the process ends
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    def _run(self) -> None:
        me = threading.get_ident()
        main = threading.main_thread().ident
        while not self._stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                kind = "loop" if ident == main else _kind(names.get(ident, "?"), frame)
                self.stacks[(kind, tuple(_stack(frame)))] += 1

    def write(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        lines = [f"samples: {self.samples} every {self.interval * 1000:g} ms"]
        by_kind: dict[str, collections.Counter[tuple[str, ...]]] = collections.defaultdict(
            collections.Counter
        )
        for (kind, stack), n in self.stacks.items():
            by_kind[kind][stack] += n
        for kind, stacks in sorted(by_kind.items()):
            total = sum(stacks.values())
            idle = sum(n for s, n in stacks.items() if s and _is_idle(s[-1]))
            busy = total - idle
            lines.append(f"\n== {kind}: {total} samples, {busy} busy ({busy / self.samples:.1%})")
            incl: collections.Counter[str] = collections.Counter()
            excl: collections.Counter[str] = collections.Counter()
            for stack, n in stacks.items():
                if stack and _is_idle(stack[-1]):
                    continue
                for fn in set(stack):
                    incl[fn] += n
                if stack:
                    excl[stack[-1]] += n
            lines.append("-- inclusive (share of all samples)")
            for fn, n in incl.most_common(45):
                lines.append(f"{n / self.samples:7.1%}  {fn}")
            lines.append("-- exclusive")
            for fn, n in excl.most_common(25):
                lines.append(f"{n / self.samples:7.1%}  {fn}")
        lines += PROBE.report()
        lines.append("\n== collapsed")
        for (kind, stack), n in self.stacks.most_common():
            lines.append(f"{kind};{';'.join(stack)} {n}")
        self.out.write_text("\n".join(lines) + "\n")


def _is_idle(top: str) -> bool:
    name = top.split(" ", 1)[0]
    return name in _IDLE or name in ("wait", "_wait_for_tstate_lock", "get", "acquire", "sleep")


def _kind(name: str, frame: FrameType) -> str:
    stack = _stack(frame)
    if any("usage.py" in s for s in stack):
        return "usage-writer"
    if any("credits.py" in s for s in stack):
        return "ledger-writer"
    return "thread:" + name.split("-")[0].split("_")[0]


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv or not argv:
        raise SystemExit("usage: sampler.py OUT [--interval S] -- -m MODULE ARGS...")
    split = argv.index("--")
    own, rest = argv[:split], argv[split + 1 :]
    interval = 0.005
    if "--interval" in own:
        interval = float(own[own.index("--interval") + 1])
    if len(rest) < 2 or rest[0] != "-m":
        raise SystemExit("sampler.py: give the program as -- -m MODULE ARGS...")
    _patch_uvicorn()
    Sampler(Path(own[0]), interval).start()
    sys.argv = [rest[1], *rest[2:]]
    time.sleep(0)
    runpy.run_module(rest[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
