"""Istio-kind objects for tests (from a YAML spec; a gateway's TLS Secret; a Service
with one loopback endpoint) and an ingress gateway on loopback."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import yaml
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from apiserver.pki import CertificateAuthority, cert_pem, key_pem, new_key
from meshagent import gateway as gw
from shoal.api.core.v1 import core_pb2


def spec_object(cls: type, text: str, *, name: str, namespace: str) -> Any:
    """A ``cls`` (VirtualService, Gateway, ...) whose spec is the YAML ``text``."""
    o = cls()
    json_format.ParseDict({"spec": yaml.safe_load(text)}, o)
    o.metadata.name, o.metadata.namespace = name, namespace
    return o


def tls_secret(ca: CertificateAuthority, *, host: str, name: str, namespace: str,
               with_ca: bool = False) -> core_pb2.Secret:
    """A kubernetes.io/tls Secret with a server certificate for ``host`` issued by
    ``ca`` and its key; ``with_ca`` adds the CA as ``ca.crt`` (for TLS mode MUTUAL)."""
    key = new_key()
    leaf = ca.issue(key.public_key(), common_name=host, dns_names=[host], server=True)
    secret = core_pb2.Secret(type="kubernetes.io/tls")
    secret.metadata.name, secret.metadata.namespace = name, namespace
    secret.metadata.resource_version = "1"
    secret.data["tls.crt"] = cert_pem(leaf)
    secret.data["tls.key"] = key_pem(key)
    if with_ca:
        secret.data["ca.crt"] = cert_pem(ca.cert)
    return secret


def loopback_service(name: str, namespace: str, *, port_name: str, port: int,
                     target_port: int) -> tuple[core_pb2.Service, core_pb2.Endpoints]:
    """A Service ``port`` (named ``port_name``) and its Endpoints: one address,
    127.0.0.1:``target_port`` (an app of the test's, outside the mesh)."""
    svc = core_pb2.Service()
    svc.metadata.name, svc.metadata.namespace = name, namespace
    svc.spec.ports.add(name=port_name, port=port)
    eps = core_pb2.Endpoints()
    eps.metadata.name, eps.metadata.namespace = name, namespace
    subset = eps.subsets.add()
    subset.addresses.add(ip="127.0.0.1")
    subset.ports.add(name=port_name, port=target_port)
    return svc, eps


def loopback_gateway(registry: CollectorRegistry, *, labels: Mapping[str, str],
                     gateways: list[Any], virtual_services: list[Any],
                     services: list[core_pb2.Service], endpoints: list[core_pb2.Endpoints],
                     secrets: Mapping[str, core_pb2.Secret]) -> gw.Gateway:
    """An ingress gateway listening on 127.0.0.1, as the pod
    istio-system/istio-ingressgateway with ``labels``, without a tunnel pool (its
    destinations are outside the mesh), given these objects; ``apply()`` binds it."""
    me = gw.Workload(namespace="istio-system", name="istio-ingressgateway",
                     service_account="istio-ingressgateway", ip="127.0.0.1", labels=labels)
    g = gw.Gateway(me=me, trust_domain="cluster.local", listen_host="127.0.0.1", pool=None,
                   registry=registry, rng=random.Random(7))
    g.update(gateways=gateways, virtual_services=virtual_services, destination_rules=[],
             services=services, endpoints=endpoints, pods=[], secrets=secrets)
    return g
