"""Protocol selection for a Service port: Istio's explicit rules, never a guess (pure)."""

from __future__ import annotations

import pytest

from shoal.meshprotocol import AppProtocol, port_protocol

HTTP, HTTP2, TCP, UDP = AppProtocol.HTTP, AppProtocol.HTTP2, AppProtocol.TCP, AppProtocol.UDP


@pytest.mark.parametrize(("name", "app_protocol", "transport", "protocol", "source"), [
    # appProtocol decides, whatever the name says.
    ("", "http", "TCP", HTTP, "appProtocol"),
    ("tcp-db", "http", "TCP", HTTP, "appProtocol"),
    ("http-web", "tcp", "TCP", TCP, "appProtocol"),
    ("", "HTTP2", "TCP", HTTP2, "appProtocol"),
    ("", "grpc", "TCP", HTTP2, "appProtocol"),
    ("", "grpc-web", "TCP", HTTP2, "appProtocol"),
    ("", "h2c", "TCP", HTTP2, "appProtocol"),
    ("", "kubernetes.io/h2c", "TCP", HTTP2, "appProtocol"),
    ("", "kubernetes.io/ws", "TCP", HTTP, "appProtocol"),
    ("", "https", "TCP", TCP, "appProtocol"),
    ("", "mysql", "TCP", TCP, "appProtocol"),
    # An appProtocol Istio does not know: TCP, and nothing declared it.
    ("http", "example.com/custom", "TCP", TCP, "none"),
    # Else the name: exactly the protocol, or <protocol>-<suffix>.
    ("http", None, "TCP", HTTP, "name"),
    ("http-web", None, "TCP", HTTP, "name"),
    ("HTTP-Web", None, "TCP", HTTP, "name"),
    ("http2", None, "TCP", HTTP2, "name"),
    ("http2-api", None, "TCP", HTTP2, "name"),
    ("grpc", None, "TCP", HTTP2, "name"),
    ("grpc-api", None, "TCP", HTTP2, "name"),
    ("grpc-web", None, "TCP", HTTP2, "name"),
    ("grpc-web-ui", None, "TCP", HTTP2, "name"),
    ("tcp-db", None, "TCP", TCP, "name"),
    ("tls", None, "TCP", TCP, "name"),
    ("redis", None, "TCP", TCP, "name"),
    # Nothing declared: TCP by default, and ambiguous.
    ("", None, "TCP", TCP, "none"),
    ("", "", "TCP", TCP, "none"),
    ("web", None, "TCP", TCP, "none"),
    ("httpx", None, "TCP", TCP, "none"),
    ("webhttp", None, "TCP", TCP, "none"),
    ("metrics-http", None, "TCP", TCP, "none"),
    # A UDP or SCTP port is not the mesh's, whatever it is called.
    ("dns", None, "UDP", UDP, "transport"),
    ("http", "http", "SCTP", UDP, "transport"),
    # A ServiceEntry's or Gateway's port: its protocol field, as appProtocol.
    ("http", "HTTP", "TCP", HTTP, "appProtocol"),
    ("api", "GRPC-WEB", "TCP", HTTP2, "appProtocol"),
    ("mongo", "MONGO", "TCP", TCP, "appProtocol"),
    ("https", "HTTPS", "TCP", TCP, "appProtocol"),
    # An empty transport is Kubernetes' default, TCP.
    ("http", None, "", HTTP, "name"),
])
def test_port_protocol(name: str, app_protocol: str | None, transport: str,
                       protocol: AppProtocol, source: str) -> None:
    choice = port_protocol(name=name, app_protocol=app_protocol, transport=transport)
    assert (choice.protocol, choice.source) == (protocol, source)
    assert choice.ambiguous == (source == "none")
    assert choice.is_http == (protocol in (HTTP, HTTP2))
