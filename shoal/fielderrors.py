"""Field errors worded as Kubernetes words them ("Required value", "Invalid value:
\"x\": why", "Unsupported value: ..."), with its reason codes. Shared by the
validation of every kind (shoal.validation, shoal.trafficrules)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from google.protobuf.message import Message

from shoal.errors import FieldError
from shoal.manifests import encode_message

REQUIRED = "FieldValueRequired"
INVALID = "FieldValueInvalid"
DUPLICATE = "FieldValueDuplicate"
NOT_SUPPORTED = "FieldValueNotSupported"
NOT_FOUND = "FieldValueNotFound"
TOO_LONG = "FieldValueTooLong"
FORBIDDEN = "FieldValueForbidden"


def show(value: object) -> str:
    """A value as Kubernetes prints it in a message: strings quoted, objects as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Message):
        value = encode_message(value)
    if isinstance(value, (str, Mapping, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return str(value)


def required(path: str, detail: str = "") -> FieldError:
    return FieldError(path, f"Required value: {detail}" if detail else "Required value",
                      REQUIRED)


def invalid(path: str, value: object, detail: str) -> FieldError:
    return FieldError(path, f"Invalid value: {show(value)}: {detail}", INVALID)


def duplicate(path: str, value: object) -> FieldError:
    return FieldError(path, f"Duplicate value: {show(value)}", DUPLICATE)


def not_supported(path: str, value: object, supported: Sequence[str]) -> FieldError:
    choices = ", ".join(show(s) for s in supported)
    return FieldError(path, f"Unsupported value: {show(value)}: supported values: {choices}",
                      NOT_SUPPORTED)


def not_found(path: str, value: object) -> FieldError:
    return FieldError(path, f"Not found: {show(value)}", NOT_FOUND)


def too_long(path: str, limit: int) -> FieldError:
    return FieldError(path, f"Too long: may not be more than {limit} bytes", TOO_LONG)


def forbidden(path: str, detail: str) -> FieldError:
    return FieldError(path, f"Forbidden: {detail}", FORBIDDEN)
