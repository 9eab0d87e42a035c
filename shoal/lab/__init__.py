"""``shoal lab``: a multi-node Shoal cluster on one Linux machine (root).

Modules: ``topology`` (names and addresses, pure), ``state`` (the JSON record
of what was made), ``preflight`` (what the machine lacks), ``netsetup``
(bridge, namespaces, veths, iptables), ``supervising`` (processes by PID and
start time), ``restarting`` (when a dead daemon is restarted, pure),
``supervisor`` (the lab's detached process that restarts them), ``lab`` (up,
down, status and the fault commands).

This package sits beside the CLI: it may start the daemons, but no daemon and
no SDK module imports it.
"""
