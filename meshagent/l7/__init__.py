"""The mesh agent's L7 (HTTP) data plane, Istio sidecar semantics on ztunnel transport.

    routes      VirtualService compile + match -> Action (pure)
    upstream    DestinationRule: clusters, subsets, load balancing, pool limits,
                outlier detection (pure, clock injected)
    http1       the HTTP/1.1 codec (httptools): streaming, hop-by-hop headers
    engine      the request engine: route -> cluster -> fault -> pick -> upstream
                connection pool -> response, with timeouts, retries and mirroring
    telemetry   istio_requests_total & co, the access log, trace context, spans
    destservice which Service a request to a local pod was for (the destination
                reporter's destination_service): an index by pod IP:port (pure)
"""
