"""``shoal config view``: the client config file, key material hidden.

Without ``--raw`` every ``*Data`` field is replaced as kubectl does:
certificates by ``DATA+OMITTED`` and the private key by ``REDACTED``. The file
is shown as written (paths stay paths); it must still be a valid config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from shoal import config as configmod
from shoal import errors
from shoal.cli.reporting import ConfigError, ExitCode
from shoal.cli.session import Session
from shoal.manifests import dump_yaml


def redact(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The config document with key material replaced."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "clientKeyData" and value:
            out[key] = "REDACTED"
        elif key.endswith("Data") and value:
            out[key] = "DATA+OMITTED"
        else:
            out[key] = value
    return out


def run_config_view(session: Session, *, raw: bool) -> int:
    path = Path(session.config_path) if session.config_path else configmod.default_path()
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read client config {path}: {e.strerror}") from None
    try:
        configmod.parse(text, source=str(path), base=path.parent)
    except errors.ShoalError as e:
        raise ConfigError(e.message) from None
    if raw:
        session.out.write(text if text.endswith("\n") else text + "\n")
        return ExitCode.OK
    doc = yaml.safe_load(text)
    session.out.write(dump_yaml(redact(doc)))
    return ExitCode.OK
