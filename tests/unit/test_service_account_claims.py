"""Service-account token claims and the node rule for TokenRequest (pure)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from apiserver.pki import Identity
from apiserver.serviceaccounts import (
    Bound,
    PodFacts,
    TokenSigner,
    check_claims,
    make_claims,
    restrict_node,
)
from shoal import errors

ISS = "https://kubernetes.default.svc.cluster.local"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
BOUND = Bound(namespace="ns", name="robot", sa_uid="u1", pod_name="web", pod_uid="p1")


def test_claims_have_kubernetes_shape_and_round_trip_through_es256() -> None:
    claims = make_claims(issuer=ISS, audiences=[ISS], bound=BOUND, now=T0, lifetime=3600)
    assert claims["sub"] == "system:serviceaccount:ns:robot"
    assert claims["exp"] - claims["iat"] == 3600 and claims["nbf"] == claims["iat"]
    assert claims["kubernetes.io"] == {"namespace": "ns",
                                       "serviceaccount": {"name": "robot", "uid": "u1"},
                                       "pod": {"name": "web", "uid": "p1"}}
    signer = TokenSigner(ec.generate_private_key(ec.SECP256R1()))
    token = signer.sign(claims)
    assert signer.verify(token) == claims
    assert check_claims(claims, issuer=ISS, audiences=(ISS,), now=T0.timestamp() + 10) == BOUND


@pytest.mark.parametrize(("change", "now_offset", "message"), [
    ({}, 3600, "expired at"),
    ({}, -120, "not valid yet"),
    ({"aud": ["vault"]}, 0, "audience"),
    ({"iss": "https://elsewhere"}, 0, "issuer"),
    ({"sub": "system:serviceaccount:ns:other"}, 0, "subject"),
])
def test_bad_claims_are_refused_with_the_reason(change: dict[str, object], now_offset: int,
                                                 message: str) -> None:
    claims = {**make_claims(issuer=ISS, audiences=[ISS], bound=BOUND, now=T0, lifetime=3600),
              **change}
    with pytest.raises(errors.Unauthorized, match=message):
        check_claims(claims, issuer=ISS, audiences=(ISS,), now=T0.timestamp() + now_offset)


ADMIN = Identity(user="admin", groups=("system:masters",))
NODE_A = Identity(user="system:node:a", groups=("system:nodes",))
POD_ON_A = PodFacts(uid="p1", node_name="a", service_account="robot")
POD_ON_B = PodFacts(uid="p2", node_name="b", service_account="robot")


@pytest.mark.parametrize(("caller", "sa", "pod", "refusal"), [
    (ADMIN, "robot", None, None),
    (NODE_A, "robot", POD_ON_A, None),
    (NODE_A, "robot", POD_ON_B, "does not run the bound pod"),
    (NODE_A, "robot", None, "only bound to a pod"),
    (NODE_A, "other", POD_ON_A, "runs as 'robot'"),
    # Users are the authorizer's business (RBAC: create serviceaccounts/token).
    (Identity(user="alice", groups=()), "robot", None, None),
])
def test_nodes_get_tokens_only_bound_to_their_own_pods(
        caller: Identity, sa: str, pod: PodFacts | None, refusal: str | None) -> None:
    if refusal is None:
        restrict_node(caller, service_account=sa, pod=pod)
    else:
        with pytest.raises(errors.Forbidden, match=refusal):
            restrict_node(caller, service_account=sa, pod=pod)


_SIGNER = TokenSigner(ec.generate_private_key(ec.SECP256R1()))


@given(st.one_of(
    st.text(max_size=300),
    st.lists(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                     max_size=120), min_size=1, max_size=5).map(".".join),
))
@settings(max_examples=300, deadline=None)
def test_any_malformed_bearer_token_is_unauthorized_never_a_crash(token: str) -> None:
    with pytest.raises(errors.Unauthorized):
        claims = _SIGNER.verify(token)
        check_claims(claims, issuer=ISS, audiences=(ISS,), now=T0.timestamp())


@given(st.dictionaries(st.sampled_from(["iss", "aud", "exp", "nbf", "sub", "kubernetes.io"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=20),
                                 st.lists(st.text(max_size=5), max_size=3),
                                 st.dictionaries(st.text(max_size=5), st.text(max_size=5),
                                                 max_size=3))))
@settings(max_examples=300, deadline=None)
def test_signed_but_odd_claims_are_unauthorized_never_a_crash(claims: dict[str, object]) -> None:
    token = _SIGNER.sign(claims)
    with pytest.raises(errors.Unauthorized):
        check_claims(_SIGNER.verify(token), issuer=ISS, audiences=(ISS,), now=T0.timestamp())
