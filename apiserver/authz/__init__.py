"""Authorization and audit for the apiserver.

    attributes   what a request asks to do; an authorizer's decision (pure)
    rbac         Roles, ClusterRoles and bindings: rule matching and the index
    nodegraph    pods bound to each node and the objects they use
    nodes        the node authorizer (kube's Node authorizer + NodeRestriction)
    access       the chain (system:masters, Node, RBAC) and the verdict
    bootstrap    the built-in ClusterRoles and bindings, reconciled at start
    review       the access-review RPC behind `shoal auth can-i`
    audit        the audit policy and the JSON-lines audit log

``apiserver.rpc`` runs every call through them (``Guard``, ``Call``).
"""
