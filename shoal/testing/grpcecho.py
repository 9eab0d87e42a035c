"""A gRPC test service, ``test.Echo``, with raw bytes for messages (no proto), for tests
of the mesh's and the gateway's HTTP/2 paths with a real grpcio server:

    Say(b)        -> b + b"!"   (with ``seen``: each call's string metadata kept there)
    Forbidden(b)  -> as Say (a path a test's policy denies)
    Missing       -> aborts NOT_FOUND "no such greeting"
    Count(b"N")   -> N messages, the i-th str(i) repeated 1,000 times (server streaming)
    Sum(stream)   -> the total length of what the client streamed, as text

``start(address)`` runs it on a grpcio server of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

Context = grpc.aio.ServicerContext[bytes, bytes]
SERVICE = "test.Echo"


def handlers(seen: list[dict[str, str]] | None = None) -> Any:
    """The service's handlers, for ``grpc.aio.Server.add_generic_rpc_handlers``."""

    async def say(request: bytes, context: Context) -> bytes:
        if seen is not None:
            seen.append({k: v for k, v in context.invocation_metadata() or ()
                         if isinstance(v, str)})
        return request + b"!"

    async def missing(request: bytes, context: Context) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such greeting")
        raise AssertionError("abort returns never")

    async def count(request: bytes, context: Context) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode() * 1000

    async def total(requests: AsyncIterator[bytes], context: Context) -> bytes:
        n = 0
        async for r in requests:
            n += len(r)
        return str(n).encode()

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Missing": grpc.unary_unary_rpc_method_handler(missing),
        "Forbidden": grpc.unary_unary_rpc_method_handler(say),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Sum": grpc.stream_unary_rpc_method_handler(total),
    })


async def start(address: str, seen: list[dict[str, str]] | None = None
                ) -> tuple[grpc.aio.Server, int]:
    """A started grpcio server of the service, without TLS, on ``address`` (host:port,
    port 0 for any); the server (``stop`` it) and the port it took."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers(seen),))
    port = server.add_insecure_port(address)
    await server.start()
    return server, port
