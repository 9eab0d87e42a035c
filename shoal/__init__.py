"""Shoal: a cluster runtime in Python (orchestration + service mesh over gRPC).

The SDK's entry points::

    shoal.Client / shoal.AsyncClient   typed access to the resource API
    shoal.Informer                     list + watch + cache + handlers
    shoal.WorkQueue                    level-triggered keys for controllers
    shoal.errors                       NotFound, Conflict, Invalid, Expired, ...
"""

from shoal import errors
from shoal.client import AsyncClient, Client, ObjectList, WatchEvent
from shoal.informer import Informer, key_of
from shoal.queueing import WorkQueue

__all__ = [
    "AsyncClient", "Client", "Informer", "ObjectList", "WatchEvent", "WorkQueue", "errors",
    "key_of",
]
__version__ = "0.1.0"
