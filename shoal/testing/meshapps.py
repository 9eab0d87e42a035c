"""A test app for the L7 mesh e2e tests, all busybox, and a client to count its answers.

The app (``app_pod`` / ``app_deployment``) is a small HTTP/1.1 server in busybox
``sh`` behind ``nc -ll -e`` (the lab's busybox is Debian's busybox-static: its
``httpd`` runs CGI only under ``/cgi-bin/`` and has no proxy, so a script that
reads the request itself is what answers on *every* path). Per request:

- ``?status=N`` answers status N, ``?delay=S`` sleeps S seconds first (both may
  be combined: ``?delay=2&status=503``);
- the body names the pod and its version and echoes the request: first line
  ``pod=<name> version=<v> app=<app> status=<N>``, then ``request <method>
  <target> <proto>``, ``body-bytes <n>``, then one ``header <Name>: <value>`` line
  per request header as received (so a test sees ``x-b3-*``/``traceparent``
  and header rewrites);
- response header ``X-App-Version: <v>``; keep-alive unless the client closes
  (HTTP/1.0 or ``Connection: close``); request bodies by Content-Length or
  chunked are read and counted.

The client (``send``) runs Python inside a pod's network namespace (as
:mod:`shoal.testing.podnet` does), so its traffic is the pod's own and the
mesh captures it; it sends N requests on keep-alive connections and returns a
:class:`Tally` of answers by version, status and pod.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.testing import podnet

IMAGE = "docker.io/library/busybox:1.36"
APP_PORT = 8080

# One connection: requests until the client closes. POD_NAME, VERSION and APP
# come from the environment (hostname is the pod's name).
HANDLER = r"""#!/bin/sh
CR=$(printf '\r')
me="pod=${POD_NAME:-$(hostname)} version=${VERSION:-none} app=${APP:-app}"
while IFS= read -r line; do
  line=${line%"$CR"}
  [ -z "$line" ] && continue
  set -- $line
  method=$1 target=$2 proto=$3
  hdrs="" len=0 chunked="" close=""
  [ "$proto" = "HTTP/1.0" ] && close=1
  while IFS= read -r h; do
    h=${h%"$CR"}
    [ -z "$h" ] && break
    hdrs="$hdrs
header $h"
    case "$h" in
      [Cc]ontent-[Ll]ength:*) len=${h#*:}; len=$((len));;
      [Tt]ransfer-[Ee]ncoding:*[Cc]hunked*) chunked=1;;
      [Cc]onnection:*[Cc]lose*) close=1;;
      [Cc]onnection:*[Kk]eep-[Aa]live*) close="";;
    esac
  done
  got=0
  if [ -n "$chunked" ]; then
    while IFS= read -r size; do
      size=${size%"$CR"}; size=$((0x${size%%;*}))
      [ "$size" -eq 0 ] && break
      n=$(dd bs=1 count=$size 2>/dev/null | wc -c); got=$((got + n))
      IFS= read -r _
    done
    while IFS= read -r t; do t=${t%"$CR"}; [ -z "$t" ] && break; done
  elif [ "$len" -gt 0 ]; then
    got=$(dd bs=1 count=$len 2>/dev/null | wc -c)
  fi
  query=""
  case "$target" in *\?*) query=${target#*\?};; esac
  status=${STATUS:-200} delay=${DELAY:-}
  case "&$query&" in *"&status="*) status=${query#*status=}; status=${status%%&*};; esac
  case "&$query&" in *"&delay="*) delay=${query#*delay=}; delay=${delay%%&*};; esac
  [ -n "$delay" ] && sleep "$delay"
  body="$me status=$status
request $method $target $proto
body-bytes $got$hdrs
"
  if [ -n "$close" ]; then conn=close; else conn=keep-alive; fi
  printf 'HTTP/1.1 %s Test\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n' \
    "$status" "${#body}"
  printf 'Connection: %s\r\nX-App-Version: %s\r\n\r\n%s' "$conn" "${VERSION:-none}" "$body"
  [ -n "$close" ] && exit 0
done
"""


def app_command(port: int = APP_PORT) -> list[str]:
    """The container command: write the handler, serve it on ``port``."""
    return ["sh", "-c", f"cat > /handler <<'SHOAL_EOF'\n{HANDLER}SHOAL_EOF\n"
                        f"chmod +x /handler && exec nc -ll -p {port} -e /handler"]


def _template(spec: core_pb2.PodSpec, *, app: str, version: str, port: int, sa: str,
              node: str) -> None:
    spec.service_account_name = sa
    spec.termination_grace_period_seconds = 1
    if node:
        spec.node_name = node
    c = spec.containers.add(name="app", image=IMAGE)
    c.command.extend(app_command(port))
    c.ports.add(name="http", container_port=port)
    c.env.add(name="VERSION", value=version)
    c.env.add(name="APP", value=app)


def app_pod(name: str, namespace: str, *, app: str, version: str = "v1", node: str = "",
            sa: str = "", port: int = APP_PORT,
            labels: Mapping[str, str] | None = None,
            env: Mapping[str, str] | None = None) -> core_pb2.Pod:
    """One app pod labelled ``app``/``version`` (plus ``labels``). ``env`` may set
    STATUS and DELAY: the answer's status and delay when the query names none."""
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, namespace
    p.metadata.labels.update({"app": app, "version": version, **(labels or {})})
    _template(p.spec, app=app, version=version, port=port, sa=sa, node=node)
    for key, value in (env or {}).items():
        p.spec.containers[0].env.add(name=key, value=value)
    return p


def app_deployment(name: str, namespace: str, *, app: str, version: str = "v1",
                   replicas: int = 1, sa: str = "", port: int = APP_PORT) -> apps_pb2.Deployment:
    """A Deployment of the app, its pods labelled ``app``/``version``."""
    d = apps_pb2.Deployment()
    d.metadata.name, d.metadata.namespace = name, namespace
    d.spec.replicas = replicas
    labels = {"app": app, "version": version}
    d.spec.selector.match_labels.update(labels)
    d.spec.template.metadata.labels.update(labels)
    _template(d.spec.template.spec, app=app, version=version, port=port, sa=sa, node="")
    return d


def http_service(name: str, namespace: str, *, app: str, port: int = 80,
                 target_port: int = APP_PORT, port_name: str = "http") -> core_pb2.Service:
    """A Service for the app's pods; ``port_name`` http makes it an HTTP port."""
    s = core_pb2.Service()
    s.metadata.name, s.metadata.namespace = name, namespace
    s.spec.selector["app"] = app
    p = s.spec.ports.add(name=port_name, port=port)
    p.target_port.int_val = target_port
    return s


def client_pod(name: str, namespace: str, *, node: str = "", sa: str = "",
               labels: Mapping[str, str] | None = None) -> core_pb2.Pod:
    """A pod that only sleeps: tests send from its network namespace."""
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, namespace
    p.metadata.labels.update(dict(labels or {"app": name}))
    p.spec.service_account_name = sa
    p.spec.termination_grace_period_seconds = 1
    if node:
        p.spec.node_name = node
    p.spec.containers.add(name="main", image=IMAGE).command.extend(["sleep", "3600"])
    return p


# -- answers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One answer: status, and what the app's body says (empty when it was not
    the app answering, e.g. a mesh 503)."""

    status: int
    pod: str = ""
    version: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # what the app received
    body: str = ""
    response_headers: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        """A request header as the app received it (case-insensitive)."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def parse_reply(status: int, body: str,
                response_headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    first = body.split("\n", 1)[0]
    words = dict(w.split("=", 1) for w in first.split() if "=" in w)
    headers = []
    for line in body.splitlines():
        if line.startswith("header "):
            k, _, v = line[len("header "):].partition(":")
            headers.append((k.strip(), v.strip()))
    return Reply(status=status, pod=words.get("pod", ""), version=words.get("version", ""),
                 headers=tuple(headers), body=body, response_headers=response_headers)


@dataclass
class Tally:
    replies: list[Reply] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # connection-level failures

    @property
    def by_version(self) -> collections.Counter[str]:
        return collections.Counter(r.version for r in self.replies if r.version)

    @property
    def by_status(self) -> collections.Counter[int]:
        return collections.Counter(r.status for r in self.replies)

    @property
    def by_pod(self) -> collections.Counter[str]:
        return collections.Counter(r.pod for r in self.replies if r.pod)

    def ok(self) -> int:
        return sum(1 for r in self.replies if 200 <= r.status < 300)


# Sends argv[1] JSON {"host", "port", "paths", "headers", "count", "method",
# "timeout", "concurrency"} and prints one JSON line per answer.
_CLIENT = r"""
import http.client, json, sys, threading
spec = json.loads(sys.argv[1])
lock = threading.Lock()
out = []
def worker(n):
    conn = None
    for i in range(n):
        path = spec["paths"][i % len(spec["paths"])]
        try:
            if conn is None:
                conn = http.client.HTTPConnection(spec["host"], spec["port"],
                                                  timeout=spec["timeout"])
            conn.request(spec["method"], path, body=spec.get("body"),
                         headers=spec["headers"])
            r = conn.getresponse()
            body = r.read().decode(errors="replace")
            rec = {"status": r.status, "body": body, "headers": r.getheaders()}
            if r.will_close:
                conn.close(); conn = None
        except Exception as e:
            rec = {"error": f"{type(e).__name__}: {e}"}
            if conn is not None:
                conn.close(); conn = None
        with lock:
            out.append(rec)
workers = max(1, spec["concurrency"])
share = [spec["count"] // workers + (1 if k < spec["count"] % workers else 0)
         for k in range(workers)]
ts = [threading.Thread(target=worker, args=(s,)) for s in share]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(out))
"""


def send(netns: str, host: str, port: int, *, count: int = 1, path: str = "/",
         paths: list[str] | None = None, headers: Mapping[str, str] | None = None,
         method: str = "GET", body: str | None = None, concurrency: int = 1,
         timeout: float = 10.0) -> Tally:
    """``count`` requests from the pod whose network namespace is ``netns`` to
    ``host``:``port`` (a Service name resolves through the mesh's DNS, or use its
    ClusterIP), on keep-alive connections; ``paths`` cycle when given."""
    spec = {"host": host, "port": port, "paths": paths or [path],
            "headers": dict(headers or {}), "count": count, "method": method, "body": body,
            "timeout": timeout, "concurrency": concurrency}
    r = podnet.in_netns(netns, _CLIENT, json.dumps(spec),
                        timeout=60 + count * timeout / max(1, concurrency))
    if r.returncode != 0:
        raise AssertionError(f"client failed: {r.stderr.strip()[-2000:]}")
    tally = Tally()
    for rec in json.loads(r.stdout.strip().splitlines()[-1]):
        if "error" in rec:
            tally.errors.append(rec["error"])
        else:
            tally.replies.append(parse_reply(rec["status"], rec["body"],
                                             tuple(tuple(h) for h in rec["headers"])))
    return tally
