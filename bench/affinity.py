"""Cache affinity with the real llama.cpp service: ``python -m bench.affinity [--conversations 30
--turns 10]``.

For each mode (``RMA_AFFINITY`` off, then on) it starts a real ``rma coordinator serve`` and three
real agents (``rma worker join --services llm --runtime process``), each running the built-in
`llm` service (SmolLM2-135M, llama.cpp's RAM prompt cache on), and plays the same conversations
through the gateway with the `openai` SDK, streaming: round by round, every conversation sends
its next turn (a few at a time), so the conversations interleave on every worker, as a busy pool's
do.  Each turn carries the whole conversation so far (its own system prompt, every question and
every answer), so prompts grow and a cached prefix matters.

Figures: the median (and p90) time to the first streamed token of turns 2..N, and the cache hit
rate of those turns, read from each llm service's ``GET /health`` counters before and after them:
hits (requests with at least half of the prompt reused) per request, and prompt tokens reused per
prompt token.  No ``x-rma-session`` header: the gateway keys a conversation by its first two
messages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

MODEL = "smollm2-135m"
TOPICS = [
    "sailing", "gardening", "chess", "baking bread", "astronomy", "cycling", "jazz", "pottery",
    "beekeeping", "mountaineering", "photography", "knitting", "birdwatching", "woodworking",
    "coffee", "tea", "volcanoes", "rivers", "castles", "trains", "robots", "dinosaurs",
    "painting", "poetry", "football", "tennis", "origami", "cheese", "mushrooms", "lighthouses",
]  # fmt: skip
QUESTIONS = [
    "What should a beginner know first?",
    "Which mistake is the most common?",
    "What tool would you buy first?",
    "How long does it take to get good?",
    "Can you name a famous expert?",
    "What is a good first project?",
    "How much does it cost to start?",
    "Is it safe for children?",
    "What is the best season for it?",
    "Where can I learn more?",
    "What do experts still disagree on?",
    "Give me one last tip.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pool:
    url: str
    admin_key: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def admin(self) -> httpx.Client:
        headers = {"authorization": f"Bearer {self.admin_key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def wait_for(what: str, check: Any, timeout: float, procs: list[subprocess.Popen[bytes]]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"{p.args!r} exited with {p.returncode} while waiting for {what}")
        with contextlib.suppress(httpx.HTTPError):
            found = check()
            if found:
                return found
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


@contextlib.contextmanager
def pool(tmp: Path, *, affinity: bool, workers: int, threads: int) -> Iterator[Pool]:
    """A coordinator and `workers` agents with the llm service, all healthy; stopped after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp / f"coord-{port}"
    env = {
        **os.environ,
        "RMA_AFFINITY": "true" if affinity else "false",
        "RMA_ANONYMOUS_CLIENTS": "true",
        "RMA_HEARTBEAT_INTERVAL": "1",
    }
    args = [sys.executable, "-m", "rma", "coordinator", "serve", "--port", str(port)]
    args += ["--data-dir", str(data), "--log-level", "warning"]
    procs: list[subprocess.Popen[bytes]] = []
    with open(tmp / f"coordinator-{port}.log", "ab") as log:
        procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:

        def up() -> bool:
            return httpx.get(url + "/healthz").status_code == 200

        wait_for("the coordinator", up, 60, procs)
        the_pool = Pool(url, (data / "admin.key").read_text().strip(), procs)
        with the_pool.admin() as c:
            body = {"ttl": 600, "uses": workers, "label": "bench"}
            token = c.post("/api/admin/tokens", json=body).raise_for_status().json()["token"]
        agent_env = {**env, "RMA_LLM_N_THREADS": str(threads)}
        for i in range(workers):
            name = f"w{i + 1}"
            join = ["--coordinator", url, "--token", token, "--name", name, "--services", "llm"]
            join += ["--runtime", "process", "--transport", "direct"]
            join += ["--data-dir", str(tmp / f"{name}-{port}")]
            with open(tmp / f"{name}-{port}.log", "ab") as log:
                cmd = [sys.executable, "-m", "rma", "worker", "join", *join]
                procs.append(
                    subprocess.Popen(cmd, env=agent_env, stdout=log, stderr=subprocess.STDOUT)
                )

        def healthy() -> bool:
            return len(endpoints(the_pool)) == workers

        wait_for(f"{workers} healthy llm services", healthy, 300, procs)
        yield the_pool
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def endpoints(p: Pool) -> dict[str, str]:
    """Worker name -> its healthy llm service's endpoint."""
    with p.admin() as c:
        found = {}
        for w in c.get("/api/admin/workers").raise_for_status().json():
            for s in w["services"]:
                if s["name"] == "llm" and s["healthy"] and s.get("endpoint"):
                    found[w["name"]] = s["endpoint"]
        return found


def cache_counters(p: Pool) -> dict[str, int]:
    """The llm services' cache counters, summed over the workers."""
    total = {"requests": 0, "hits": 0, "prompt_tokens": 0, "cached_tokens": 0}
    for endpoint in endpoints(p).values():
        cache = httpx.get(endpoint.rstrip("/") + "/health", timeout=30).json()["cache"]
        for k in total:
            total[k] += int(cache[k])
    return total


def conversation(i: int) -> list[dict[str, str]]:
    topic = TOPICS[i % len(TOPICS)]
    system = (
        f"You are a friendly expert on {topic} (conversation {i}). Answer in one short sentence, "
        f"plainly, without lists. Keep to {topic}; if asked about anything else, bring the talk "
        f"back to {topic}."
    )
    return [{"role": "system", "content": system}]


def one_turn(
    client: OpenAI, messages: list[dict[str, str]], question: str, max_tokens: int
) -> tuple[float, str, str]:
    """Ask `question` in the conversation; (seconds to the first token, answer, worker)."""
    messages.append({"role": "user", "content": question})
    start = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    first: float | None = None
    parts: list[str] = []
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
    answer = "".join(parts).strip() or "I see."
    messages.append({"role": "assistant", "content": answer})
    ttft = first if first is not None else time.perf_counter() - start
    return ttft, answer, raw.headers.get("x-rma-worker", "?")


def run_mode(tmp: Path, args: argparse.Namespace, *, affinity: bool) -> dict[str, Any]:
    with pool(tmp, affinity=affinity, workers=args.workers, threads=args.threads) as p:
        client = OpenAI(base_url=p.url + "/v1", api_key="none", timeout=300, max_retries=0)
        convs = [conversation(i) for i in range(args.conversations)]
        workers_of: list[set[str]] = [set() for _ in convs]
        later: list[float] = []
        first_round: list[float] = []
        before: dict[str, int] = {}
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as ex:
            for turn in range(args.turns):
                if turn == 1:
                    before = cache_counters(p)
                question = QUESTIONS[turn % len(QUESTIONS)]
                asks = [ex.submit(one_turn, client, m, question, args.max_tokens) for m in convs]
                results = [a.result() for a in asks]
                for i, (ttft, _, worker) in enumerate(results):
                    (first_round if turn == 0 else later).append(ttft)
                    workers_of[i].add(worker)
                print(
                    f"  affinity {'on' if affinity else 'off'}: turn {turn + 1}/{args.turns} "
                    f"median TTFT {statistics.median(t for t, _, _ in results) * 1000:.0f} ms",
                    file=sys.stderr,
                )
        elapsed = time.perf_counter() - started
        after = cache_counters(p)
        client.close()
    delta = {k: after[k] - before.get(k, 0) for k in after}
    later.sort()
    return {
        "affinity": affinity,
        "ttft_turn1_median_ms": round(statistics.median(first_round) * 1000, 1),
        "ttft_later_median_ms": round(statistics.median(later) * 1000, 1),
        "ttft_later_p90_ms": round(later[int(0.9 * (len(later) - 1))] * 1000, 1),
        "hit_rate": round(delta["hits"] / max(delta["requests"], 1), 3),
        "token_reuse": round(delta["cached_tokens"] / max(delta["prompt_tokens"], 1), 3),
        "later_requests": delta["requests"],
        "mean_prompt_tokens": round(delta["prompt_tokens"] / max(delta["requests"], 1)),
        "workers_per_conversation": round(statistics.mean(len(w) for w in workers_of), 2),
        "seconds": round(elapsed, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--conversations", type=int, default=30, help="conversations (default 30)")
    ap.add_argument("--turns", type=int, default=10, help="turns per conversation (default 10)")
    ap.add_argument("--workers", type=int, default=3, help="agents, each with llm (default 3)")
    ap.add_argument("--concurrency", type=int, default=3, help="requests at once (default 3)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per worker")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = ap.parse_args()
    if args.turns < 2 or args.conversations < 1:
        ap.error("need at least one conversation and two turns")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rma-affinity-") as tmp:
        rows = [run_mode(Path(tmp), args, affinity=a) for a in (False, True)]
    print(
        f"{args.conversations} conversations x {args.turns} turns, {args.workers} workers, "
        f"c={args.concurrency}, max_tokens={args.max_tokens}; load average {load:.1f} -> "
        f"{os.getloadavg()[0]:.1f}"
    )
    header = (
        "| affinity | TTFT turn 1 p50 | TTFT turns 2+ p50 | p90 | cache hit rate "
        "| prompt tokens reused | workers per conversation | run |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {'on' if r['affinity'] else 'off'} | {r['ttft_turn1_median_ms']:.0f} ms "
            f"| {r['ttft_later_median_ms']:.0f} ms | {r['ttft_later_p90_ms']:.0f} ms "
            f"| {r['hit_rate']:.0%} | {r['token_reuse']:.0%} "
            f"| {r['workers_per_conversation']:.2f} | {r['seconds']:.0f} s |"
        )
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": None}, "rows": rows}))


if __name__ == "__main__":
    main()
