"""A worker that really cannot be reached: the agent in a network namespace, behind the tunnel.

Layout (root only; CI runs as root)::

    host                                   namespace rma-XXXX
    coordinator on 10.213.N.1:PORT  <--veth-->  10.213.N.2  (no default route)
    openai SDK / rma infer -> coordinator     rma worker join --transport tunnel
                                               services on 127.0.0.1 inside the namespace

The namespace's only way out is the /30 towards the coordinator.  Inbound connections are
refused twice over: an iptables REJECT for new TCP connections on the veth (when iptables works
here), and nothing in the namespace listens on the veth address (services bind the namespace's
own 127.0.0.1, which the host cannot reach).  The test proves it by connecting from the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FAKE_BACKEND = ROOT / "bench" / "fake_backend.py"
CATALOG = f"""
[services.fake]
description = "fake OpenAI backend (fast and deterministic)"
tier = 3
kind = "openai"
models = ["fake-model", "fake-embed"]
command = ["{{python}}", "{FAKE_BACKEND}", "--port", "{{port}}", "--name", "in-netns"]
health = "/health"
"""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMA_")}
    env.pop("RMA_TEST_DATABASE_URL", None)
    return {**env, "NO_COLOR": "1", **extra}


@dataclass
class Netns:
    name: str
    host_ip: str
    ns_ip: str
    veth_ns: str
    iptables: bool

    def exec(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]


@contextlib.contextmanager
def netns() -> Iterator[Netns]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns) to build an unreachable worker")
    tag = f"{random.randrange(16**4):04x}"
    name, vh, vn = f"rma-{tag}", f"rvh{tag}", f"rvn{tag}"
    used = sh("ip", "-o", "addr").stdout
    third = next(n for n in random.sample(range(1, 255), 254) if f"10.213.{n}." not in used)
    host_ip, ns_ip = f"10.213.{third}.1", f"10.213.{third}.2"
    if sh("ip", "netns", "add", name, check=False).returncode != 0:
        pytest.skip("cannot create a network namespace here (ip netns add failed)")
    try:
        sh("ip", "link", "add", vh, "type", "veth", "peer", "name", vn)
        sh("ip", "link", "set", vn, "netns", name)
        sh("ip", "addr", "add", f"{host_ip}/30", "dev", vh)
        sh("ip", "link", "set", vh, "up")
        ns = Netns(name, host_ip, ns_ip, vn, iptables=False)
        sh(*ns.exec("ip", "addr", "add", f"{ns_ip}/30", "dev", vn))
        sh(*ns.exec("ip", "link", "set", vn, "up"))
        sh(*ns.exec("ip", "link", "set", "lo", "up"))
        if shutil.which("iptables"):
            rule = ("-i", vn, "-p", "tcp", "--syn", "-j", "REJECT", "--reject-with", "tcp-reset")
            ns.iptables = (
                sh(*ns.exec("iptables", "-A", "INPUT", *rule), check=False).returncode == 0
            )
        yield ns
    finally:
        pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "link", "del", vh, check=False)
        sh("ip", "netns", "del", name, check=False)


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up")


def stop(proc: subprocess.Popen[bytes], group: bool = False) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            proc.wait(5)


@dataclass
class Stack:
    ns: Netns
    url: str
    api_key: str
    agent_log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("netns")
    catalog = tmp / "catalog.toml"
    catalog.write_text(CATALOG)
    with netns() as ns:
        port = 18000 + random.randrange(2000)
        url = f"http://{ns.host_ip}:{port}"
        env = clean_env(RMA_HEARTBEAT_INTERVAL="1", RMA_TUNNEL_PING_INTERVAL="1")
        env["RMA_CONFIG"] = str(tmp / "none.toml")
        coord_log = tmp / "coordinator.log"
        with open(coord_log, "wb") as fh:
            coord = subprocess.Popen(
                [sys.executable, "-m", "rma", "coordinator", "serve", "--host", ns.host_ip]
                + ["--port", str(port), "--data-dir", str(tmp / "coord"), "--catalog", str(catalog)]
                + ["--log-level", "warning"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
            )
        agent: subprocess.Popen[bytes] | None = None
        try:
            wait_http(url + "/healthz", coord, "the coordinator")
            admin = {"authorization": f"Bearer {(tmp / 'coord' / 'admin.key').read_text().strip()}"}
            with httpx.Client(base_url=url, headers=admin, timeout=10) as c:
                token = c.post("/api/admin/tokens", json={"ttl": 600, "uses": 1}).json()["token"]
                api_key = c.post("/api/admin/keys", json={"name": "t", "rpm": 0}).json()["key"]
            agent_log = tmp / "agent.log"
            with open(agent_log, "wb") as fh:
                agent = subprocess.Popen(
                    ns.exec(sys.executable, "-m", "rma", "worker", "join", "--coordinator", url)
                    + ["--token", token, "--name", "behind-nat", "--transport", "tunnel"]
                    + ["--runtime", "process", "--catalog", str(catalog)]
                    + ["--data-dir", str(tmp / "worker")]
                    + ["--insecure"],  # plain http:// to another (network) machine, on purpose
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=clean_env(RMA_CONFIG=str(tmp / "none.toml")),
                    start_new_session=True,
                )
            s = Stack(ns, url, str(api_key), agent_log)
            wait_answering(s, agent)
            yield s
        finally:
            if agent is not None:
                stop(agent, group=True)
            stop(coord)


def wait_answering(s: Stack, agent: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "ping"}]}
    last = ""
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise RuntimeError(f"the agent exited:\n{s.agent_log.read_text()[-3000:]}")
        r = httpx.post(
            s.url + "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {s.api_key}"},
            timeout=10,
        )
        if r.status_code == 200:
            return
        last = r.text
        time.sleep(0.3)
    raise RuntimeError(f"no answer through the tunnel: {last}\n{s.agent_log.read_text()[-3000:]}")


def listening(s: Stack) -> list[tuple[str, int]]:
    out = sh(*s.ns.exec("ss", "-ltnH")).stdout
    found = []
    for line in out.splitlines():
        local = line.split()[3]
        host, _, port = local.rpartition(":")
        found.append((host.strip("[]"), int(port)))
    return found


def test_the_worker_cannot_be_reached_from_the_host(stack: Stack) -> None:
    socks = listening(stack)
    assert socks, "the service should be listening inside the namespace"
    assert all(host in ("127.0.0.1", "::1") for host, _ in socks), socks  # loopback only
    assert "default" not in sh(*stack.ns.exec("ip", "route")).stdout  # no way out but the /30
    for _, port in socks:
        # inside the namespace, it answers ...
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)"
        inside = sh(*stack.ns.exec(sys.executable, "-c", probe), check=False)
        assert inside.returncode == 0, inside.stderr
        # ... from the host, through the namespace's only address, nothing does
        with pytest.raises((ConnectionRefusedError, TimeoutError)):
            socket.create_connection((stack.ns.ns_ip, port), 2).close()


def test_openai_sdk_gets_answers_through_the_tunnel(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key, max_retries=0)
    messages: Any = [{"role": "user", "content": "hello from outside"}]
    answer = client.chat.completions.create(model="fake-model", messages=messages)
    assert answer.system_fingerprint == "in-netns"
    assert answer.choices[0].message.content
    chunks = list(
        client.chat.completions.create(model="fake-model", messages=messages, stream=True)
    )
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with httpx.Client(base_url=stack.url, timeout=10) as c:
        workers = c.get(
            "/api/admin/workers", headers={"authorization": f"Bearer {admin_key(stack)}"}
        ).json()
    assert [w["transport"] for w in workers] == ["tunnel"]


def test_rma_infer_gets_answers_through_the_tunnel(stack: Stack) -> None:
    base = [sys.executable, "-m", "rma", "infer", "say hi", "--model", "fake-model"]
    base += ["--coordinator", stack.url, "--api-key", stack.api_key]
    env = clean_env(RMA_CONFIG="/nonexistent/rma.toml")
    streamed = subprocess.run(base, capture_output=True, text=True, env=env, timeout=60)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip()
    plain = subprocess.run(
        [*base, "--no-stream", "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    assert plain.returncode == 0, plain.stderr
    doc = json.loads(plain.stdout)
    assert doc


def admin_key(stack: Stack) -> str:
    return (stack.agent_log.parent / "coord" / "admin.key").read_text().strip()
