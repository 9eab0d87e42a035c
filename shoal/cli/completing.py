"""Shell completion: ``shoal completion bash|zsh`` prints a script; the script
asks ``shoal __complete WORD...`` (hidden) for the candidates.

    shell: Tab --> shoal __complete <words after "shoal", the last one partial>
           --> candidates(), one per line --> the shell filters by the prefix

What is completed, from the argparse parser itself (so new commands and flags
complete with no change here):

- the command, and a subcommand (``rollout status``, ``config view``);
- flags of the command when the word starts with ``-``; the values of flags
  with choices (``-o``); namespaces after ``-n``;
- kinds where a command takes KIND (get, describe, delete, explain, ...),
  object names after a kind, ``kind/name`` after ``kind/``; pods where a
  command takes a pod (exec, logs, port-forward, debug).

Names come from the server, listed in the namespace of ``-n`` if it is on
the line; any failure there (no config, server down) completes nothing,
quietly. The planner is pure: the server is behind :data:`Lister`.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from shoal import errors
from shoal.kinds import KindTable

# (kind as typed, namespace or None for the config's) -> object names
Lister = Callable[[str, str | None], Awaitable[list[str]]]

# Commands whose first positional is KIND (then names, or KIND/NAME).
KIND_COMMANDS = frozenset({"get", "describe", "delete", "scale", "wait", "explain"})
# Commands whose first positional is a pod (or KIND/NAME for some).
POD_COMMANDS = frozenset({"exec", "logs", "port-forward", "debug"})
HIDDEN = frozenset({"__complete"})


@dataclass(frozen=True)
class Request:
    """What to list: fixed words, kinds, or names of a kind."""

    words: tuple[str, ...] = ()
    kind: str = ""  # list names of this kind
    prefix: str = ""  # put before each name ("deploy/")
    namespace: str | None = None


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {k: v for k, v in action.choices.items() if k not in HIDDEN}
    return {}


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def _kind_words(kinds: KindTable) -> tuple[str, ...]:
    words = set()
    for k in kinds:
        words.add(k.resource)
        words.update(k.short_names)
    return tuple(sorted(words))


def plan(parser: argparse.ArgumentParser, kinds: KindTable, words: Sequence[str]) -> Request:
    """What the last word of ``words`` (the one being typed) can be."""
    if not words:
        words = [""]
    *done, current = words
    command: str | None = None
    sub = parser
    positionals: list[str] = []
    namespace: str | None = None
    skip = False
    path: list[str] = []
    for i, word in enumerate(done):
        if skip:
            skip = False
            continue
        if word.startswith("-"):
            flag = word.split("=", 1)[0]
            action = _flags(sub).get(flag)
            takes = action is not None and action.nargs != 0 and "=" not in word
            if takes:
                skip = True
                if flag in ("-n", "--namespace") and i + 1 < len(done):
                    namespace = done[i + 1]
            elif flag in ("-n", "--namespace") and "=" in word:
                namespace = word.split("=", 1)[1]
            continue
        children = _subparsers(sub)
        if children and word in children and len(positionals) == 0:
            path.append(word)
            command = command or word
            sub = children[word]
            continue
        positionals.append(word)
    # The value of a flag?
    if done and done[-1].startswith("-") and "=" not in done[-1]:
        action = _flags(sub).get(done[-1])
        if action is not None and action.nargs != 0:
            if action.choices:
                return Request(words=tuple(str(c) for c in action.choices))
            if done[-1] in ("-n", "--namespace"):
                return Request(kind="namespaces")
            return Request()  # a free value (a file, a number): nothing to offer
    if current.startswith("-"):
        return Request(words=tuple(sorted(s for s in _flags(sub) if s.startswith("--")
                                          or len(s) == 2)))
    children = _subparsers(sub)
    if children and not positionals:
        return Request(words=tuple(sorted(children)))
    if command in KIND_COMMANDS:
        if "/" in current:
            kind = current.split("/", 1)[0]
            return Request(kind=kind, prefix=f"{kind}/", namespace=namespace)
        if not positionals:
            return Request(words=_kind_words(kinds))
        if command != "explain":
            return Request(kind=positionals[0].split(",")[0], namespace=namespace)
        return Request()
    if command in POD_COMMANDS and not positionals:
        if "/" in current:
            kind = current.split("/", 1)[0]
            return Request(kind=kind, prefix=f"{kind}/", namespace=namespace)
        return Request(kind="pods", namespace=namespace)
    if command == "rollout" and len(path) > 1:
        if "/" in current:
            kind = current.split("/", 1)[0]
            return Request(kind=kind, prefix=f"{kind}/", namespace=namespace)
        return Request(words=("daemonsets", "deployments", "statefulsets") if not positionals
                       else (), kind=positionals[0] if positionals else "",
                       namespace=namespace)
    return Request()


async def candidates(request: Request, lister: Lister) -> list[str]:
    out = list(request.words)
    if request.kind:
        try:
            names = await lister(request.kind, request.namespace)
        except (errors.ShoalError, OSError):
            names = []
        out += [f"{request.prefix}{n}" for n in names]
    return out


def script(shell: str) -> str:
    if shell == "bash":
        return BASH
    if shell == "zsh":
        return ZSH
    raise errors.BadRequest(f"unsupported shell {shell!r}: use bash or zsh")


BASH = r"""# shoal completion for bash: source <(shoal completion bash)
_shoal_complete() {
    local cur="${COMP_WORDS[COMP_CWORD]}"
    local IFS=$'\n'
    COMPREPLY=( $(compgen -W "$(shoal __complete "${COMP_WORDS[@]:1:COMP_CWORD}" \
        2>/dev/null)" -- "$cur") )
}
complete -o default -F _shoal_complete shoal
"""

ZSH = r"""#compdef shoal
# shoal completion for zsh: source <(shoal completion zsh)
_shoal_complete() {
    local -a candidates
    candidates=("${(@f)$(shoal __complete "${(@)words[2,CURRENT]}" 2>/dev/null)}")
    compadd -a candidates
}
compdef _shoal_complete shoal
"""


def run_complete(parser: argparse.ArgumentParser, kinds: KindTable, words: Sequence[str],
                 *, lister_for: Callable[[], Lister]) -> list[str]:
    """The candidates for ``words`` (synchronous: the CLI's entry point)."""
    request = plan(parser, kinds, words)
    return asyncio.run(candidates(request, lister_for())) if request.kind else list(
        request.words)
