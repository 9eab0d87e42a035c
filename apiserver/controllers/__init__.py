"""The controllers that run inside the apiserver, behind one leader election.

Each controller is a small class with ``name`` and ``async run(ctx)``; it reads
the cluster only through the SDK (shared Informers from ``ctx.informers``) and
writes through ``ctx.client``, exactly as an out-of-process controller would.
``CONTROLLERS`` maps a name to its factory; ``--controllers`` picks which run.
"""

from __future__ import annotations

from collections.abc import Callable

from apiserver.controllers.base import Controller

ControllerFactory = Callable[[], Controller]


def builtin_controllers() -> dict[str, ControllerFactory]:
    """Every controller this apiserver can run, by name (import lazily)."""
    out: dict[str, ControllerFactory] = {}
    out["garbagecollector"] = _garbagecollector
    out["endpoints"] = _endpoints
    out["replicaset"] = _replicaset
    out["deployment"] = _deployment
    out["scheduler"] = _scheduler
    out["nodelifecycle"] = _nodelifecycle
    out["daemonset"] = _daemonset
    out["statefulset"] = _statefulset
    out["horizontalpodautoscaling"] = _horizontalpodautoscaling
    return out


def _garbagecollector() -> Controller:
    from apiserver.controllers.garbagecollector import GarbageCollector

    return GarbageCollector()


def _endpoints() -> Controller:
    from apiserver.controllers.endpoints import EndpointsController

    return EndpointsController()


def _scheduler() -> Controller:
    from apiserver.controllers.scheduling import Scheduler

    return Scheduler()


def _nodelifecycle() -> Controller:
    from apiserver.controllers.nodelifecycle import NodeLifecycleController

    return NodeLifecycleController()


def _replicaset() -> Controller:
    from apiserver.controllers.replicasets import ReplicaSetController

    return ReplicaSetController()


def _deployment() -> Controller:
    from apiserver.controllers.deployments import DeploymentController

    return DeploymentController()


def _daemonset() -> Controller:
    from apiserver.controllers.daemonsets import DaemonSetController

    return DaemonSetController()


def _horizontalpodautoscaling() -> Controller:
    from apiserver.controllers.podautoscaler import HorizontalPodAutoscalerController

    return HorizontalPodAutoscalerController()


def _statefulset() -> Controller:
    from apiserver.controllers.statefulsets import StatefulSetController

    return StatefulSetController()
