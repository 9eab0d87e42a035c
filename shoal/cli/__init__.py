"""The ``shoal`` command: kubectl-style operations on a Shoal cluster.

Modules, each named after what it does:

- ``main``: argument parsing, dispatch, exit codes (``shoal = shoal.cli.main:main``);
- ``reporting``: exit codes and how errors are worded;
- ``session``: global flags, streams, clock, the lazily built client;
- ``loading``: reading ``-f`` files, directories and stdin;
- ``targets``: what ``KIND NAME...`` / ``KIND/NAME`` arguments name;
- ``fetching``: reads shared by the commands;
- ``printing``: kubectl's tables (pure);
- ``applying``: apply planning (pure) and execution;
- ``getting``, ``describing``, ``deleting``, ``discovering``, ``configuring``:
  the commands.

The user-facing reference, with the exit codes, is ``docs/cli.md``.
"""
