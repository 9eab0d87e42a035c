"""SPIFFE IDs of mesh workloads: ``spiffe://<trust domain>/ns/<namespace>/sa/<sa>``.

Shared by the apiserver (which signs them) and the meshagent (which requests
and checks them). Parsing is strict, after the SPIFFE ID spec: lowercase trust
domain of letters, digits, ``.``, ``-`` and ``_``; no port, user info, query or
fragment; and Istio's path shape, with a valid namespace and service account.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shoal import naming

SCHEME = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")


class InvalidSpiffeId(ValueError):
    """The text is not a workload SPIFFE ID; the message says what is wrong."""


def check_trust_domain(value: str) -> list[str]:
    if not value:
        return ["the trust domain is empty"]
    if len(value) > 255:
        return ["the trust domain must be no more than 255 characters"]
    if not _TRUST_DOMAIN.match(value):
        return [f"trust domain {value!r} may contain only lowercase letters, digits, "
                "'.', '-' and '_'"]
    return []


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def of(cls, *, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        """A checked ID; InvalidSpiffeId names the first bad part."""
        for what, value, problems in (
            ("trust domain", trust_domain, check_trust_domain(trust_domain)),
            ("namespace", namespace, naming.check_dns1123_label(namespace)),
            ("service account", service_account,
             naming.check_dns1123_subdomain(service_account)),
        ):
            if problems:
                raise InvalidSpiffeId(f"invalid {what} {value!r}: {problems[0]}")
        return cls(trust_domain, namespace, service_account)


def parse(uri: str) -> SpiffeId:
    """``spiffe://td/ns/NS/sa/SA`` -> SpiffeId, or InvalidSpiffeId saying why not."""
    if not uri.startswith(SCHEME):
        raise InvalidSpiffeId(f"{uri!r} is not a SPIFFE ID: it must start with {SCHEME}")
    rest = uri[len(SCHEME):]
    for ch, what in (("?", "a query"), ("#", "a fragment")):
        if ch in rest:
            raise InvalidSpiffeId(f"SPIFFE ID {uri!r} must not have {what}")
    authority, slash, path = rest.partition("/")
    if "@" in authority or ":" in authority:
        raise InvalidSpiffeId(f"SPIFFE ID {uri!r} must not have a port or user info")
    problems = check_trust_domain(authority)
    if problems:
        raise InvalidSpiffeId(f"SPIFFE ID {uri!r}: {problems[0]}")
    parts = path.split("/") if slash else []
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        raise InvalidSpiffeId(
            f"SPIFFE ID {uri!r} must have the path /ns/<namespace>/sa/<service account>")
    return SpiffeId.of(trust_domain=authority, namespace=parts[1], service_account=parts[3])
