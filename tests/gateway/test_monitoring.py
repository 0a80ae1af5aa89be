"""The shipped monitoring files against a real Prometheus scraping a real coordinator.

Every expression of ``containers/grafana/dashboards/rma-pool.json`` must return data through
Prometheus's HTTP API once a little real traffic (successes, a retry, a broken stream, errors)
has gone through the gateway: a panel that would stay empty is a failure.  Prometheus is the
Debian package ``prometheus`` (``/usr/bin/prometheus``); without it the test skips (a failure
under ``RMA_REQUIRE_ALL=1``).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "containers/grafana/dashboards/rma-pool.json"
SCRAPE_CONFIG = ROOT / "containers/prometheus/prometheus.yml"
CHAT = [{"role": "user", "content": "hello there"}]
#: Grafana's variables, as Prometheus needs them: a 1 s scrape makes 1 m a wide enough window.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "${service}": ".*",
                     "$service": ".*"}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Every ``(panel title, PromQL)`` of the dashboard, Grafana variables substituted."""
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                expr = target["expr"]
                for var, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(var, value)
                out.append((panel["title"], expr))

    walk(dashboard["panels"])
    return out


def test_the_dashboard_names_only_known_variables() -> None:
    """Each ``$...`` in an expression is one the test substitutes (else it could not check it)."""
    exprs = dashboard_expressions(json.loads(DASHBOARD.read_text()))
    assert len(exprs) >= 15
    leftovers = [(title, e) for title, e in exprs if "$" in e]
    assert leftovers == []


@pytest.fixture
def prometheus(tmp_path: Path, pool: Any) -> Iterator[str]:
    """A real Prometheus on 127.0.0.1 scraping ``pool``'s coordinator every second, with the
    shipped scrape config (its target and interval replaced); stopped afterwards."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    (job,) = config["scrape_configs"]
    job["static_configs"][0]["targets"] = [pool.url.removeprefix("http://")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{log.read_text()}"
            try:
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"prometheus did not start:\n{log.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _query(client: httpx.Client, expr: str) -> list[Any]:
    r = client.get("/api/v1/query", params={"query": expr})
    body = r.json()
    assert r.status_code == 200, f"{expr}: {body}"
    assert body["status"] == "success", f"{expr}: {body}"
    return list(body["data"]["result"])


def _traffic(pool: Any, backends: Any) -> None:
    """Successes, one retry, one broken stream and a few kinds of error, through the gateway."""
    a, b = backends("a"), backends("b")
    pool.add_worker("wa", {"fake": a.url})
    pool.add_worker("wb", {"fake": b.url})
    client = openai.OpenAI(base_url=pool.url + "/v1", api_key=pool.api_key, max_retries=0)
    try:
        for _ in range(5):
            client.chat.completions.create(model="fake-model", messages=CHAT)
        client.embeddings.create(model="fake-embed", input=["one"])
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=CHAT)
        with pytest.raises(openai.InternalServerError):  # both answer 503: a retry, then 503
            client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "[503]"}]
            )
        with pytest.raises(openai.APIError):  # the stream breaks after its first chunk
            for _ in client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "[reset]"}], stream=True
            ):
                pass
    finally:
        client.close()
    with httpx.Client(base_url=pool.url, timeout=10) as anonymous:
        assert anonymous.post("/v1/chat/completions", json={}).status_code == 401


def test_every_dashboard_expression_returns_data(prometheus: str, pool: Any, backends) -> None:
    _traffic(pool, backends)
    exprs = dashboard_expressions(json.loads(DASHBOARD.read_text()))
    missing: list[str] = []
    with httpx.Client(base_url=prometheus, timeout=10) as prom:
        deadline = time.monotonic() + 90
        while True:
            missing = [f"{title}: {e}" for title, e in exprs if not _query(prom, e)]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert missing == [], "dashboard expressions without data:\n" + "\n".join(missing)

        up = _query(prom, 'up{job="rma-coordinator"}')
        assert [s["value"][1] for s in up] == ["1"]
        # What the traffic did shows, with the right labels.
        codes = {s["metric"]["code"] for s in _query(prom, "rma_gateway_errors_total")}
        assert {"model_not_found", "missing_api_key", "stream_broken"} <= codes
        assert _query(prom, 'sum(rma_gateway_retries_total{service="fake"})')[0]["value"][1] != "0"
        healthy = _query(prom, 'rma_service_replicas{service="fake",state="healthy"}')
        assert [s["value"][1] for s in healthy] == ["2"]
        workers = {s["metric"]["worker"] for s in _query(prom, "rma_worker_inflight")}
        assert workers == {"wa", "wb"}
        # The dashboard's variable (label_values(rma_service_replicas, service)) has values.
        r = prom.get("/api/v1/label/service/values", params={"match[]": "rma_service_replicas"})
        assert "fake" in r.json()["data"]


def test_the_scrape_config_is_valid() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    cmd = [promtool, "check", "config", str(SCRAPE_CONFIG)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    """The datasource uid the panels use is the provisioned one; the provider's path is where
    compose mounts the dashboards."""
    grafana = ROOT / "containers/grafana"
    (source,) = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yaml").read_text())[
        "datasources"
    ]
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}
    (provider,) = yaml.safe_load((grafana / "provisioning/dashboards/rma.yaml").read_text())[
        "providers"
    ]
    compose = yaml.safe_load((ROOT / "containers/compose.monitoring.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert re.fullmatch(r"[a-z0-9-]+", dashboard["uid"])


def _samples(text: str) -> dict[str, float]:
    """``/metrics`` text -> ``{'name{labels}': value}``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def test_the_metrics_the_dashboard_reads(pool: Any, backends) -> None:
    """Without Prometheus too: the same traffic, read straight from ``/metrics``."""
    _traffic(pool, backends)
    m = _samples(httpx.get(pool.url + "/metrics", timeout=10).text)
    assert m['rma_gateway_errors_total{service="-",code="model_not_found"}'] == 1
    assert m['rma_gateway_errors_total{service="-",code="missing_api_key"}'] == 1
    assert m['rma_gateway_errors_total{service="fake",code="upstream_unavailable"}'] == 1
    assert m['rma_gateway_errors_total{service="fake",code="stream_broken"}'] == 1
    # one wait per attempt: 5 chats, 1 embedding, 2 for the retried 503, 1 for the stream
    assert m['rma_gateway_queue_wait_seconds_count{service="fake"}'] == 9
    assert m['rma_gateway_queue_wait_seconds_bucket{service="fake",le="+Inf"}'] == 9
    assert m['rma_service_replicas{service="fake",state="healthy"}'] == 2
    assert m['rma_service_replicas{service="fake",state="assigned"}'] == 2
    assert m['rma_service_replicas{service="fake",state="wanted"}'] >= 2
    assert m['rma_worker_inflight{worker="wa",status="online"}'] == 0
    assert m['rma_worker_inflight{worker="wb",status="online"}'] == 0
    assert m["rma_tunnels_connected"] == 0


def test_a_request_that_queues_shows_its_wait(pool_factory: Any, backends) -> None:
    """One slot, two requests at once for a backend that takes 1 s: the second waits about 1 s
    for the slot (at least until the first answer, however loaded the machine is)."""
    pool = pool_factory(env={"RMA_WORKER_CAPACITY": "1"})
    pool.add_worker("wa", {"fake": backends("a").url})
    slow = {"model": "fake-model", "messages": [{"role": "user", "content": "[slow:1]"}]}
    with pool.client() as c, ThreadPoolExecutor(2) as ex:
        answers = list(ex.map(lambda _: c.post("/v1/chat/completions", json=slow), range(2)))
    assert [r.status_code for r in answers] == [200, 200]
    m = _samples(httpx.get(pool.url + "/metrics", timeout=10).text)
    assert m['rma_gateway_queue_wait_seconds_count{service="fake"}'] == 2
    assert m['rma_gateway_queue_wait_seconds_bucket{service="fake",le="0.5"}'] <= 1
    assert m['rma_gateway_queue_wait_seconds_sum{service="fake"}'] >= 0.5
