"""``shoal dashboard`` on ``shoal lab up --mesh``, in headless Chromium (issue 11).

Runs with ``SHOAL_E2E_MESH=1`` (scripts/test.sh runs it in the mesh pass):
``SHOAL_E2E_MESH=1 flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_dashboard.py``.

Namespace ``dash``: a Deployment ``web`` of the busybox test app behind Service
web:80 (port name http) and a client pod on node-1 that sends it requests from
its network namespace. ``shoal dashboard --port 0`` runs as the user would
start it; the page is opened in headless Chromium. Checked: the deployed app is
listed, a pod created after the page loaded appears without a reload, and the
client -> web edge appears in the service graph with a rate above 0 and mTLS.
The screenshot is saved to $SHOAL_ARTIFACTS (else a temporary directory; the
path is printed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from shoal.api.core.v1 import core_pb2
from shoal.testing import browser, meshapps, podnet
from shoal.testing.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    os.environ.get("SHOAL_E2E_MESH") != "1", reason="needs a lab with --mesh (SHOAL_E2E_MESH=1)"),
    pytest.mark.skipif(bool(browser.available()), reason=browser.available() or "-")]

NS = "dash"
Cluster = Any


def _running(cluster: Cluster, name: str) -> core_pb2.Pod | None:
    p = cluster.client.get(core_pb2.Pod, name, namespace=NS)
    return p if p.status.phase == "Running" and p.status.pod_ip else None


def _ready(cluster: Cluster, selector: str) -> list[core_pb2.Pod]:
    return [p for p in cluster.client.list(core_pb2.Pod, namespace=NS,
                                           label_selector=selector).items
            if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions)]


@pytest.fixture(scope="module")
def traffic(cluster: Cluster) -> Iterator[tuple[str, str]]:
    ns = core_pb2.Namespace()
    ns.metadata.name = NS
    cluster.client.create(ns)
    cluster.client.create(meshapps.app_deployment("web", NS, app="web", replicas=2))
    cluster.client.create(meshapps.http_service("web", NS, app="web"))
    cluster.client.create(meshapps.client_pod("client", NS, node="node-1"))
    client = wait_for("the client pod runs", partial(_running, cluster, "client"),
                      timeout=120)
    wait_for("web is ready", lambda: len(_ready(cluster, "app=web")) == 2 or None,
             timeout=120)
    ip = cluster.client.get(core_pb2.Service, "web", namespace=NS).spec.cluster_ip
    target = (podnet.pod_netns(client.status.pod_ip), ip)
    wait_for("web answers through the mesh",
             lambda: meshapps.send(target[0], ip, 80, count=1, timeout=10).ok() == 1 or None,
             timeout=60)
    yield target
    cluster.shoal("delete", "namespace", NS, "--ignore-not-found")


@pytest.fixture
def dashboard_url(cluster: Cluster) -> Iterator[str]:
    env = dict(os.environ, SHOAL_CONFIG=str(cluster.config))
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli.main", "dashboard", "--port", "0",
                             "--graph-interval", "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "Serving the dashboard at http://127.0.0.1:" in line, \
            line + (proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        yield line.split(" at ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _edge(d: Any) -> Any:
    from selenium.webdriver.common.by import By

    return [e for e in d.find_elements(By.CSS_SELECTOR,
                                       f"g.edge[data-source='{NS}/client'][data-target='{NS}/web']")
            if float(e.get_attribute("data-rps") or 0) > 0] or None


def _click(driver: Any, element: Any) -> None:
    """Click as a user would; when the graph is crowded (the mesh pass's earlier
    modules leave their own workloads and edges on it) the force layout can
    leave the line under a node or at zero length, which WebDriver refuses to
    click: then deliver the same click event to the line itself."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        ElementNotInteractableException,
    )
    try:
        element.click()
    except (ElementNotInteractableException, ElementClickInterceptedException):
        driver.execute_script(
            "arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", element)


def test_the_app_and_its_traffic_edge_appear_live(cluster: Cluster, traffic: tuple[str, str],
                                                  dashboard_url: str) -> None:
    from selenium.webdriver.common.by import By

    netns, ip = traffic
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            meshapps.send(netns, ip, 80, count=10, concurrency=2, timeout=10)
            time.sleep(0.5)

    sender = threading.Thread(target=load, daemon=True)
    sender.start()
    try:
        with browser.headless_chromium(width=1280, height=1000) as d:
            d.get(dashboard_url)
            wait_for("the Deployment is listed", lambda: d.find_elements(
                By.CSS_SELECTOR, f"#deployments tr[data-name='{NS}/web']") or None, timeout=60)
            assert d.find_elements(By.CSS_SELECTOR, f"#services tr[data-name='{NS}/web']")
            late = f"{NS}/late"
            assert not d.find_elements(By.CSS_SELECTOR, f"#pods tr[data-name='{late}']")
            cluster.client.create(meshapps.client_pod("late", NS, node="node-2"))
            wait_for("a pod created after the page loaded appears", lambda: d.find_elements(
                By.CSS_SELECTOR, f"#pods tr[data-name='{late}']") or None, timeout=60)
            [edge] = wait_for("the client -> web edge carries traffic",
                              lambda: _edge(d), timeout=120)
            assert edge.get_attribute("data-mtls") == "true"
            _click(d, edge.find_element(By.TAG_NAME, "line"))
            wait_for("the edge's detail lists web's Service", lambda: "Services: web" in
                     d.find_element(By.ID, "detail").text or None, timeout=30)
            shot = browser.artifact_dir() / "dashboard-e2e.png"
            d.save_screenshot(str(shot))
            print(f"screenshot: {shot}")
    finally:
        stop.set()
        sender.join(timeout=30)
