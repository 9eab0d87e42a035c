from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkloadSignRequest(_message.Message):
    __slots__ = ("csr_pem", "namespace", "service_account", "ttl_seconds")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    namespace: str
    service_account: str
    ttl_seconds: int
    def __init__(self, csr_pem: _Optional[bytes] = ..., namespace: _Optional[str] = ..., service_account: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class WorkloadSignResponse(_message.Message):
    __slots__ = ("certificate_chain_pem", "trust_bundle", "spiffe_id")
    CERTIFICATE_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    certificate_chain_pem: bytes
    trust_bundle: TrustBundle
    spiffe_id: str
    def __init__(self, certificate_chain_pem: _Optional[bytes] = ..., trust_bundle: _Optional[_Union[TrustBundle, _Mapping]] = ..., spiffe_id: _Optional[str] = ...) -> None: ...

class TrustBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrustBundle(_message.Message):
    __slots__ = ("trust_domain", "roots_pem")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    ROOTS_PEM_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    roots_pem: bytes
    def __init__(self, trust_domain: _Optional[str] = ..., roots_pem: _Optional[bytes] = ...) -> None: ...
