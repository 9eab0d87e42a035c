"""Which protocol the mesh speaks on a Service port: declared, never guessed.

Istio's rules (its "Protocol Selection" page), without its sniffing:

1. a port whose transport is UDP or SCTP is not proxied (``UDP``);
2. else ``appProtocol``, when set, decides, Kubernetes' standard names
   included (``kubernetes.io/h2c`` is HTTP/2, ``kubernetes.io/ws`` and
   ``kubernetes.io/wss`` are HTTP);
3. else the port's name decides: ``<protocol>`` or ``<protocol>-<suffix>``
   (``http``, ``http-web``, ``grpc-api``);
4. the word found is matched case-insensitively: ``http`` is HTTP; ``http2``,
   ``grpc``, ``grpc-web`` and ``h2c`` are HTTP/2; ``https``, ``tls``, ``tcp``,
   ``mongo``, ``mysql`` and ``redis`` are opaque TCP (declared so);
5. anything else, an unnamed port included, is TCP, and *ambiguous*: Istio
   would sniff it, Shoal does not, and ``shoal mesh check`` says so.

A pure function, shared by the CLI (``shoal mesh check``) and the meshagent,
so both reach the same verdict. A ServiceEntry's or Gateway's port states its
protocol outright (``protocol: HTTP``): pass it as ``app_protocol``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

__all__ = ["AppProtocol", "ProtocolChoice", "port_protocol"]


class AppProtocol(enum.StrEnum):
    """What the mesh speaks on a port."""

    HTTP = "HTTP"
    HTTP2 = "HTTP2"  # gRPC too
    TCP = "TCP"
    UDP = "UDP"  # not proxied by the mesh


# Declared words (lower case) and what they mean.
_WORDS: dict[str, AppProtocol] = {
    "http": AppProtocol.HTTP,
    "http2": AppProtocol.HTTP2,
    "grpc": AppProtocol.HTTP2,
    "grpc-web": AppProtocol.HTTP2,
    "h2c": AppProtocol.HTTP2,
    "https": AppProtocol.TCP,
    "tls": AppProtocol.TCP,
    "tcp": AppProtocol.TCP,
    "mongo": AppProtocol.TCP,
    "mysql": AppProtocol.TCP,
    "redis": AppProtocol.TCP,
}
# Kubernetes' standard appProtocol values (only as appProtocol, never a name).
_KUBERNETES_NAMES: dict[str, AppProtocol] = {
    "kubernetes.io/h2c": AppProtocol.HTTP2,
    "kubernetes.io/ws": AppProtocol.HTTP,
    "kubernetes.io/wss": AppProtocol.HTTP,
}

Source = Literal["transport", "appProtocol", "name", "none"]


@dataclass(frozen=True)
class ProtocolChoice:
    """The verdict, and what it rests on (for ``shoal mesh check`` and explain)."""

    protocol: AppProtocol
    # Which field decided: the port's transport, appProtocol, its name, or
    # nothing (then the protocol is TCP by default).
    source: Source
    # The value looked at ("grpc", "http-web", an appProtocol Istio does not
    # know), empty when the port has neither appProtocol nor name.
    declared: str = ""

    @property
    def ambiguous(self) -> bool:
        """True when nothing declared the protocol and TCP is only the default."""
        return self.source == "none"

    @property
    def is_http(self) -> bool:
        return self.protocol in (AppProtocol.HTTP, AppProtocol.HTTP2)


def _word(value: str) -> AppProtocol | None:
    text = value.lower()
    # "grpc-web" holds a hyphen: look for it before cutting at the first one.
    if text == "grpc-web" or text.startswith("grpc-web-"):
        return AppProtocol.HTTP2
    return _WORDS.get(text.split("-", 1)[0])


def port_protocol(*, name: str, app_protocol: str | None,
                  transport: str = "TCP") -> ProtocolChoice:
    """The protocol of a Service (or ServiceEntry) port, by Istio's rules."""
    if transport and transport.upper() not in ("", "TCP"):
        return ProtocolChoice(AppProtocol.UDP, "transport", transport.upper())
    if app_protocol:
        known = _KUBERNETES_NAMES.get(app_protocol.lower()) or _word(app_protocol)
        if known is not None:
            return ProtocolChoice(known, "appProtocol", app_protocol)
        # An appProtocol Istio does not know takes the name's place: TCP.
        return ProtocolChoice(AppProtocol.TCP, "none", app_protocol)
    if name:
        known = _word(name)
        if known is not None:
            return ProtocolChoice(known, "name", name)
    return ProtocolChoice(AppProtocol.TCP, "none", "")
