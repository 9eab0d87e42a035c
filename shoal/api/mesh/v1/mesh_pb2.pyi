import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ("include_netfilter", "include_connections", "source_ip", "destination_service", "destination_ips", "direction")
    INCLUDE_NETFILTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IP_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_SERVICE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_IPS_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    include_netfilter: bool
    include_connections: bool
    source_ip: str
    destination_service: str
    destination_ips: _containers.RepeatedScalarFieldContainer[str]
    direction: str
    def __init__(self, include_netfilter: _Optional[bool] = ..., include_connections: _Optional[bool] = ..., source_ip: _Optional[str] = ..., destination_service: _Optional[str] = ..., destination_ips: _Optional[_Iterable[str]] = ..., direction: _Optional[str] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("node", "generation", "generations", "applied_time", "certificates", "netfilter", "connections", "captured_pods")
    class GenerationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_TIME_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    NETFILTER_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_PODS_FIELD_NUMBER: _ClassVar[int]
    node: str
    generation: int
    generations: _containers.ScalarMap[str, int]
    applied_time: _timestamp_pb2.Timestamp
    certificates: _containers.RepeatedCompositeFieldContainer[Certificate]
    netfilter: NetfilterReport
    connections: _containers.RepeatedCompositeFieldContainer[Connection]
    captured_pods: int
    def __init__(self, node: _Optional[str] = ..., generation: _Optional[int] = ..., generations: _Optional[_Mapping[str, int]] = ..., applied_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., certificates: _Optional[_Iterable[_Union[Certificate, _Mapping]]] = ..., netfilter: _Optional[_Union[NetfilterReport, _Mapping]] = ..., connections: _Optional[_Iterable[_Union[Connection, _Mapping]]] = ..., captured_pods: _Optional[int] = ...) -> None: ...

class Certificate(_message.Message):
    __slots__ = ("spiffe_id", "serial", "not_after", "renew_at", "state")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    RENEW_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    serial: str
    not_after: str
    renew_at: str
    state: str
    def __init__(self, spiffe_id: _Optional[str] = ..., serial: _Optional[str] = ..., not_after: _Optional[str] = ..., renew_at: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class NetfilterReport(_message.Message):
    __slots__ = ("backend", "wanted", "current", "drift", "error")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    backend: str
    wanted: _containers.RepeatedScalarFieldContainer[str]
    current: _containers.RepeatedScalarFieldContainer[str]
    drift: _containers.RepeatedScalarFieldContainer[str]
    error: str
    def __init__(self, backend: _Optional[str] = ..., wanted: _Optional[_Iterable[str]] = ..., current: _Optional[_Iterable[str]] = ..., drift: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ...) -> None: ...

class Connection(_message.Message):
    __slots__ = ("direction", "source_ip", "source_workload", "source_namespace", "source_principal", "destination", "destination_service", "endpoint", "destination_workload", "destination_namespace", "peer_principal", "tls_version", "cipher", "mode", "bytes_sent", "bytes_received", "opened_time")
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_SERVICE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PEER_PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    TLS_VERSION_FIELD_NUMBER: _ClassVar[int]
    CIPHER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    OPENED_TIME_FIELD_NUMBER: _ClassVar[int]
    direction: str
    source_ip: str
    source_workload: str
    source_namespace: str
    source_principal: str
    destination: str
    destination_service: str
    endpoint: str
    destination_workload: str
    destination_namespace: str
    peer_principal: str
    tls_version: str
    cipher: str
    mode: str
    bytes_sent: int
    bytes_received: int
    opened_time: _timestamp_pb2.Timestamp
    def __init__(self, direction: _Optional[str] = ..., source_ip: _Optional[str] = ..., source_workload: _Optional[str] = ..., source_namespace: _Optional[str] = ..., source_principal: _Optional[str] = ..., destination: _Optional[str] = ..., destination_service: _Optional[str] = ..., endpoint: _Optional[str] = ..., destination_workload: _Optional[str] = ..., destination_namespace: _Optional[str] = ..., peer_principal: _Optional[str] = ..., tls_version: _Optional[str] = ..., cipher: _Optional[str] = ..., mode: _Optional[str] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., opened_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class MeshStatusRequest(_message.Message):
    __slots__ = ("node", "query")
    NODE_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    node: str
    query: StatusRequest
    def __init__(self, node: _Optional[str] = ..., query: _Optional[_Union[StatusRequest, _Mapping]] = ...) -> None: ...

class MeshStatusResponse(_message.Message):
    __slots__ = ("cluster_revision", "nodes")
    CLUSTER_REVISION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    cluster_revision: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeMeshStatus]
    def __init__(self, cluster_revision: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeMeshStatus, _Mapping]]] = ...) -> None: ...

class NodeMeshStatus(_message.Message):
    __slots__ = ("node", "address", "error", "status", "required_generation", "pending_changes")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    PENDING_CHANGES_FIELD_NUMBER: _ClassVar[int]
    node: str
    address: str
    error: str
    status: AgentStatus
    required_generation: int
    pending_changes: int
    def __init__(self, node: _Optional[str] = ..., address: _Optional[str] = ..., error: _Optional[str] = ..., status: _Optional[_Union[AgentStatus, _Mapping]] = ..., required_generation: _Optional[int] = ..., pending_changes: _Optional[int] = ...) -> None: ...
