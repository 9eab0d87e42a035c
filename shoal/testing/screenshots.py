"""The README's dashboard screenshots, made from a real lab.

    sudo flock /tmp/shoal-e2e.lock python -m shoal.testing.screenshots [--out docs/images]

Brings up ``shoal lab up --nodes 3 --mesh`` in a temporary directory, applies
examples/bookinfo.yaml, sends requests to productpage from a client pod's
network namespace (productpage then calls details and reviews, reviews v2/v3
call ratings), runs ``shoal dashboard`` as a user would, and saves in headless
Chromium:

    dashboard-graph.png      the service graph with bookinfo's edges moving
                             (an edge clicked: its routes and policies)
    dashboard-workloads.png  nodes, deployments (rollouts), pods, services, events

then takes the lab down (``--purge``). Needs root (the lab), Debian's chromium
and chromium-driver, and selenium.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shoal import config as configmod
from shoal.api.core.v1 import core_pb2
from shoal.client import Client
from shoal.testing import browser, meshapps, podnet
from shoal.testing.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
NS = "bookinfo"
APPS = ("productpage", "details", "reviews", "ratings")


def _shoal(*args: str, config: Path | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if config is not None:
        env["SHOAL_CONFIG"] = str(config)
    r = subprocess.run([sys.executable, "-m", "shoal.cli.main", *args], env=env,
                       capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise SystemExit(f"shoal {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return r


def say(text: str) -> None:
    print(f"screenshots: {text}", file=sys.stderr, flush=True)


@contextmanager
def lab(workdir: Path) -> Iterator[Path]:
    lab_dir = workdir / "lab"
    say("shoal lab up --nodes 3 --mesh")
    try:
        _shoal("lab", "up", "--nodes", "3", "--mesh", "--dir", str(lab_dir), timeout=600)
        yield lab_dir / "admin.conf"
    finally:
        say("shoal lab down --purge")
        subprocess.run([sys.executable, "-m", "shoal.cli.main", "lab", "down", "--purge",
                        "--dir", str(lab_dir)], capture_output=True, timeout=300, check=False)


@contextmanager
def dashboard(config: Path) -> Iterator[str]:
    env = dict(os.environ, SHOAL_CONFIG=str(config))
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli.main", "dashboard", "--port", "0",
                             "--graph-interval", "2"], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if " at http" not in line:
            raise SystemExit(f"shoal dashboard did not start: {line!r}")
        yield line.split(" at ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _ready(client: Client) -> bool:
    pods = client.list(core_pb2.Pod, namespace=NS).items
    ready = [p for p in pods if any(c.type == "Ready" and c.status == "True"
                                    for c in p.status.conditions)]
    return len(pods) > len(APPS) and len(ready) == len(pods)


def _moving_edges(d: Any) -> int:
    from selenium.webdriver.common.by import By

    return sum(1 for e in d.find_elements(By.CSS_SELECTOR, "g.edge")
               if float(e.get_attribute("data-rps") or 0) > 0)


def take(config: Path, out: Path) -> list[Path]:
    from selenium.webdriver.common.by import By

    _shoal("apply", "-f", str(ROOT / "examples" / "bookinfo.yaml"), config=config)
    with Client(configmod.load(config), timeout=30) as client:
        client.create(meshapps.client_pod("traffic", NS, node="node-1"))
        say("waiting for bookinfo's pods")
        wait_for("bookinfo's pods are ready", lambda: _ready(client), timeout=300)
        pod = client.get(core_pb2.Pod, "traffic", namespace=NS)
        ip = client.get(core_pb2.Service, "productpage", namespace=NS).spec.cluster_ip
    netns = podnet.pod_netns(pod.status.pod_ip)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            meshapps.send(netns, ip, 9080, path="/productpage/", count=5, timeout=15)
            time.sleep(0.3)

    sender = threading.Thread(target=load, daemon=True)
    sender.start()
    shots = []
    try:
        with dashboard(config) as url, browser.headless_chromium(width=1280,
                                                                  height=820) as d:
            d.get(url)
            say("waiting for bookinfo's edges in the graph")
            wait_for("bookinfo's four edges move", lambda: _moving_edges(d) >= 4, timeout=180)
            time.sleep(3)  # let the force layout settle before the picture
            edge = d.find_element(By.CSS_SELECTOR, f"g.edge[data-source='{NS}/productpage']"
                                                   f"[data-target='{NS}/reviews']")
            edge.find_element(By.TAG_NAME, "line").click()
            wait_for("the edge's detail", lambda: "Services: reviews" in
                     d.find_element(By.ID, "detail").text, timeout=30)
            shots.append(out / "dashboard-graph.png")
            d.save_screenshot(str(shots[-1]))
            d.execute_script("document.getElementById('graph-section').style.display='none'")
            shots.append(out / "dashboard-workloads.png")
            d.save_screenshot(str(shots[-1]))
    finally:
        stop.set()
        sender.join(timeout=60)
    return shots


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shoal.testing.screenshots",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = p.parse_args(argv)
    why = browser.available()
    if why:
        raise SystemExit(f"screenshots: {why}")
    if os.geteuid() != 0:
        raise SystemExit("screenshots: the lab needs root")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shoal-screenshots-") as tmp, \
            lab(Path(tmp)) as config:
        shots = take(config, args.out)
    for s in shots:
        print(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
