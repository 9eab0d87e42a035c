"""Groups from the subject string gRPC's TLS layer reports (RFC 4514, OpenSSL's form)."""

from __future__ import annotations

import pytest

from shoal.nodeaccess import rdn_values


@pytest.mark.parametrize(("subject", "want"), [
    ("CN=admin,O=system:masters", ["system:masters"]),
    ("CN=al\\,ice,O=a=b,O=g\\+2,O=system:masters", ["a=b", "g+2", "system:masters"]),
    ("CN=x+O=multi,O=two", ["multi", "two"]),  # a multi-valued RDN
    ("O=caf\\C3\\A9", ["café"]),  # hex pairs are UTF-8 bytes
    ("CN=only", []),
    ("", []),
    ("o=lower", ["lower"]),
])
def test_organizations(subject: str, want: list[str]) -> None:
    assert rdn_values(subject, "O") == want
