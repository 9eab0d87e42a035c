"""``shoal dashboard``'s server against an in-process apiserver: the token is
required, the JSON views show the cluster, the event stream pushes a pod created
after it opened, and the service graph comes from (faked) meshagent metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2
from shoal.cli import dashboard
from shoal.client import AsyncClient
from shoal.testing import browser
from shoal.testing.apiserver import InProcessAPIServer

METRICS = (
    "# TYPE istio_requests_total counter\n"
    'istio_requests_total{reporter="destination",source_workload="client",'
    'source_workload_namespace="shop",destination_workload="web",'
    'destination_workload_namespace="shop",destination_service="web.shop.svc.cluster.local",'
    'response_code="200",connection_security_policy="mutual_tls"} %d\n')


class FakeMesh:
    """A meshagent's /metrics whose request counter grows by 10 per scrape."""

    def __init__(self) -> None:
        self.count = 0
        self.urls: list[str] = []

    def fetch(self, url: str) -> str:
        self.urls.append(url)
        self.count += 10
        return METRICS % self.count


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[AsyncClient, str, FakeMesh]]:
    api = InProcessAPIServer(tmp_path)
    await api.start()
    client = api.client()
    mesh = FakeMesh()
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]
    try:
        dash, server, url = await dashboard.start(client, address="127.0.0.1", port=0,
                                                  graph_interval=0.2, token="s3cret")
        dash.scraper = dashboard.GraphScraper(nodes=dash.informers["nodes"].list,
                                              clock=clock, fetch=mesh.fetch)
        task = asyncio.create_task(dash.run(server))
        try:
            yield client, url, mesh
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        await client.close()
        await api.stop()


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    return await asyncio.to_thread(_get, url, headers)


def base(url: str) -> str:
    return url.split("/?", 1)[0]


async def test_every_page_and_api_request_needs_the_runs_token(
        served: tuple[AsyncClient, str, FakeMesh]) -> None:
    _, url, _ = served
    assert url.endswith("/?token=s3cret") and url.startswith("http://127.0.0.1:")
    root = base(url)
    for path in ("/", "/api/state", "/api/graph", "/api/stream", "/api/config?ns=a&workload=b"):
        status, _ = await get(root + path)
        assert status == 401, path
        status, _ = await get(root + path + ("&" if "?" in path else "?") + "token=wrong")
        assert status == 401, path
    status, body = await get(url)
    assert status == 200 and b"/static/app.js" in body
    status, body = await get(root + "/api/state", {"Authorization": "Bearer s3cret"})
    assert status == 200 and set(json.loads(body)) >= {"nodes", "pods", "deployments",
                                                       "services", "events"}
    # Our own assets carry no cluster data and need no token.
    status, body = await get(root + "/static/app.js")
    assert status == 200 and b"EventSource" in body
    status, _ = await get(root + "/static/../dashboard.py")
    assert status == 404


async def _read_events(reader: asyncio.StreamReader) -> AsyncIterator[tuple[str, Any]]:
    event = ""
    while True:
        line = (await reader.readline()).decode()
        if not line:
            return
        if line.startswith("event: "):
            event = line[7:].strip()
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])


async def test_the_stream_pushes_a_pod_created_after_the_page_opened_and_the_graph(
        served: tuple[AsyncClient, str, FakeMesh]) -> None:
    client, url, mesh = served
    ns = core_pb2.Namespace()
    ns.metadata.name = "shop"
    await client.create(ns)
    node = core_pb2.Node()
    node.metadata.name = "node-1"
    await client.create(node)
    async with asyncio.timeout(20):
        while True:  # the node lifecycle controller may change it meanwhile
            node = await client.get(core_pb2.Node, "node-1")
            node.status.addresses.add(type="InternalIP", address="10.9.0.1")
            try:
                await client.update_status(node)
                break
            except errors.Conflict:
                continue

    port = int(base(url).rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/stream?token=s3cret HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    events = _read_events(reader)
    try:
        async with asyncio.timeout(30):
            first_state = None
            async for event, data in events:
                if event == "state":
                    first_state = data
                    break
            assert first_state is not None
            assert "web-1" not in {p["name"] for p in first_state["pods"]}
            pod = core_pb2.Pod()
            pod.metadata.name, pod.metadata.namespace = "web-1", "shop"
            pod.metadata.labels["app"] = "web"
            pod.spec.containers.add(name="web", image="busybox")
            await client.create(pod)
            seen_pod = seen_edge = False
            async for event, data in events:
                if event == "state":
                    seen_pod = seen_pod or any(p["name"] == "web-1" and p["workload"] == "web"
                                               for p in data["pods"])
                elif event == "graph":
                    edges = [e for e in data["edges"] if e["rps"] > 0]
                    seen_edge = seen_edge or any(
                        (e["source"], e["target"], e["mtls"]) ==
                        ("shop/client", "shop/web", True) for e in edges)
                if seen_pod and seen_edge:
                    break
    finally:
        writer.close()
    assert mesh.urls[0] == "http://10.9.0.1:15020/metrics"
    status, body = await get(base(url) + "/api/config?token=s3cret&ns=shop&workload=web")
    assert status == 200 and json.loads(body)["pods"] == ["web-1"]
    status, _ = await get(base(url) + "/api/config?token=s3cret&ns=shop")
    assert status == 400


@pytest.mark.skipif(bool(browser.available()), reason=browser.available() or "-")
async def test_in_headless_chromium_a_new_pod_appears_live_and_the_edge_shows_its_routes(
        served: tuple[AsyncClient, str, FakeMesh]) -> None:
    client, url, _ = served
    ns = core_pb2.Namespace()
    ns.metadata.name = "shop"
    await client.create(ns)
    node = core_pb2.Node()
    node.metadata.name = "node-1"
    node.status.addresses.add(type="InternalIP", address="10.9.0.1")
    await client.create(node)
    async with asyncio.timeout(20):
        while not dashboard.internal_ip(await client.get(core_pb2.Node, "node-1")):
            node = await client.get(core_pb2.Node, "node-1")
            node.status.addresses.add(type="InternalIP", address="10.9.0.1")
            with contextlib.suppress(errors.Conflict):
                await client.update_status(node)
    svc = core_pb2.Service()
    svc.metadata.name, svc.metadata.namespace = "web", "shop"
    svc.spec.selector["app"] = "web"
    svc.spec.ports.add(name="http", port=80)
    await client.create(svc)
    vs = traffic_pb2.VirtualService()
    vs.metadata.name, vs.metadata.namespace = "web-routes", "shop"
    vs.spec.hosts.append("web")
    vs.spec.http.add().route.add().destination.host = "web"
    await client.create(vs)
    loop = asyncio.get_running_loop()

    async def create_pod() -> None:
        pod = core_pb2.Pod()
        pod.metadata.name, pod.metadata.namespace = "web-1", "shop"
        pod.metadata.labels["app"] = "web"
        pod.spec.containers.add(name="web", image="busybox")
        await client.create(pod)

    def browse() -> Path:
        with browser.headless_chromium() as d:
            d.get(url)
            browser.wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR,
                                                          "#services tr[data-name='shop/web']"),
                             what="the Service in the table")
            assert not d.find_elements(By.CSS_SELECTOR, "#pods tr[data-name='shop/web-1']")
            asyncio.run_coroutine_threadsafe(create_pod(), loop).result(20)
            browser.wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR,
                                                          "#pods tr[data-name='shop/web-1']"),
                             what="the pod created after the page loaded")
            edge = browser.wait_for(d, lambda d: [
                e for e in d.find_elements(By.CSS_SELECTOR, "g.edge[data-target='shop/web']")
                if float(e.get_attribute("data-rps") or 0) > 0], what="a moving edge")[0]
            assert edge.get_attribute("data-mtls") == "true"
            assert edge.get_attribute("data-source") == "shop/client"
            # The force layout moves the edge for a few seconds after it appears: a
            # click aimed at where it was can land on the bare SVG. Click once it is
            # at rest, as a user would (its ends in whole pixels unchanged between
            # two polls, 0.2 s apart).
            ends: list[tuple[int, ...]] = []

            def at_rest(d: Any) -> bool:
                line = edge.find_element(By.TAG_NAME, "line")
                ends.append(tuple(round(float(line.get_attribute(a) or 0))
                                  for a in ("x1", "y1", "x2", "y2")))
                return len(ends) > 1 and ends[-1] == ends[-2]

            browser.wait_for(d, at_rest, what="the edge at rest")
            # The edge's group takes the click (its label sits on the line's middle,
            # where a click on the line would land on the label).
            edge.click()
            browser.wait_for(d, lambda d: "web-routes" in d.find_element(By.ID, "detail").text,
                             what="the edge's VirtualService in the detail panel")
            shot = browser.artifact_dir() / "dashboard-integration.png"
            d.save_screenshot(str(shot))
            return shot

    shot = await asyncio.to_thread(browse)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 0
