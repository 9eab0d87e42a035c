"""meshagent.meshhost and the mesh-only host's capture (pure)."""

from __future__ import annotations

from meshagent import capture, meshhost
from meshagent.l7 import upstream
from meshagent.routing import Route, build_routes
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2


def _svc(name: str, *, ip: str, selector: dict[str, str], port: int, target: int | str,
         port_name: str = "http") -> core_pb2.Service:
    s = core_pb2.Service()
    s.metadata.namespace, s.metadata.name = "shop", name
    s.spec.cluster_ip = ip
    s.spec.selector.update(selector)
    sp = s.spec.ports.add(name=port_name, port=port, protocol="TCP")
    if isinstance(target, int):
        sp.target_port.int_val = target
    else:
        sp.target_port.str_val = target
    return s


def _we(name: str, *, ip: str, labels: dict[str, str], ports: dict[str, int] | None = None,
        host: str = "vm1", ns: str = "shop") -> traffic_pb2.WorkloadEntry:
    we = traffic_pb2.WorkloadEntry()
    we.metadata.namespace, we.metadata.name = ns, name
    if host:
        we.metadata.labels[meshhost.MESH_HOST_LABEL] = host
    we.spec.address = ip
    we.spec.labels.update(labels)
    we.spec.ports.update(ports or {})
    return we


def test_services_select_workload_entries_beside_pods() -> None:
    legacy = _svc("legacy", ip="10.96.0.20", selector={"app": "legacy"}, port=80, target=8080)
    named = _svc("named", ip="10.96.0.21", selector={"app": "named"}, port=80, target="web")
    eps = core_pb2.Endpoints()
    eps.metadata.namespace, eps.metadata.name = "shop", "legacy"
    sub = eps.subsets.add()
    sub.addresses.add(ip="10.244.1.5")
    sub.ports.add(name="http", port=8080, protocol="TCP")
    routes = build_routes([legacy, named], {"shop/legacy": eps})
    entries = [_we("vm", ip="10.77.0.100", labels={"app": "legacy"}),
               _we("vm-named", ip="10.77.0.101", labels={"app": "named"},
                   ports={"http": 9090}),
               _we("elsewhere", ip="10.77.0.102", labels={"app": "legacy"}, ns="other")]
    out = meshhost.with_workload_entries(routes, [legacy, named], entries)
    # The numeric targetPort; the pod stays.
    assert out[("10.96.0.20", 80)].endpoints == (("10.244.1.5", 8080), ("10.77.0.100", 8080))
    # The entry's own port for the Service port's name.
    assert out[("10.96.0.21", 80)].endpoints == (("10.77.0.101", 9090),)
    assert isinstance(out[("10.96.0.21", 80)], Route)


def test_workload_entry_identity_parts() -> None:
    we = _we("vm", ip="10.77.0.100", labels={"app": "legacy"})
    assert meshhost.service_account_of(we) == "default"
    assert meshhost.workload_name_of(we) == "legacy"
    assert meshhost.mesh_host_of(we) == "vm1"
    assert meshhost.mesh_host_of(_we("x", ip="1.2.3.4", labels={}, host="")) == ""


def test_host_capture_rules() -> None:
    pre, out = capture.host_rules(["10.77.0.100"], capture.CaptureConfig(), agent_uid=0)
    assert pre[0] == ("-A SHOAL-MESH-PREROUTING -d 10.77.0.100/32 -p tcp -m tcp --dport "
                      "15008 -j REDIRECT --to-ports 15008")
    assert pre[-1] == ("-A SHOAL-MESH-PREROUTING -d 10.77.0.100/32 -p tcp -j REDIRECT "
                       "--to-ports 15006")
    assert any("--dport 15020 -j RETURN" in r for r in pre)  # the agent's readiness
    # The agent's own connections first, then DNS, the host to itself, everything else.
    assert out[0] == "-A SHOAL-MESH-OUTPUT -m owner --uid-owner 0 -j RETURN"
    assert out[-1] == "-A SHOAL-MESH-OUTPUT -p tcp -j REDIRECT --to-ports 15001"
    assert capture.host_rules([], capture.CaptureConfig(), agent_uid=0) == ((), ())


def test_host_rules_apply_and_clean_up() -> None:
    pre, out = capture.host_rules(["10.77.0.100"], capture.CaptureConfig(), agent_uid=0)
    text = capture.render_host_apply("", pre, out)
    assert "-I PREROUTING 1 -j SHOAL-MESH-PREROUTING" in text
    assert "-I OUTPUT 1 -j SHOAL-MESH-OUTPUT" in text
    save = "\n".join(["*nat", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
                      ":SHOAL-MESH-PREROUTING - [0:0]", ":SHOAL-MESH-OUTPUT - [0:0]",
                      "-A PREROUTING -j SHOAL-MESH-PREROUTING",
                      "-A OUTPUT -j SHOAL-MESH-OUTPUT", *pre, *out, "COMMIT"])
    assert not capture.host_drift(save, pre, out)
    assert capture.host_drift(save, pre, out[:-1])
    cleanup = capture.render_cleanup(save)
    assert cleanup is not None
    assert "-D OUTPUT -j SHOAL-MESH-OUTPUT" in cleanup and "-X SHOAL-MESH-OUTPUT" in cleanup
    assert "-X SHOAL-MESH-PREROUTING" in cleanup


def test_an_entry_gets_the_same_port_for_l4_routes_and_l7_clusters() -> None:
    # targetPort "web" names one of the entry's ports; the Service port is named
    # "http", another of them. The targetPort's name wins, on both paths (the L4
    # routes used to take the Service port's name).
    svc = _svc("named", ip="10.96.0.21", selector={"app": "named"}, port=80, target="web")
    entry = _we("vm", ip="10.77.0.101", labels={"app": "named"},
                ports={"web": 8081, "http": 9090})
    l4 = meshhost.with_workload_entries(build_routes([svc], {}), [svc], [entry])
    assert l4[("10.96.0.21", 80)].endpoints == (("10.77.0.101", 8081),)
    l7 = upstream.workload_entry_endpoints(svc, svc.spec.ports[0], [entry])
    assert [(e.ip, e.port) for e in l7] == [("10.77.0.101", 8081)]
