"""The grid wire protocol, shared by the grid service and its client.

One TLS 1.3 connection carries requests one after another; a client keeps a small pool of
them open. A message is a 4-byte big-endian length followed by a msgpack array:

    request  [id, operation, deadline_ms, arguments]
    reply    [id, ok, body]      body: the result map, or {"error": kind, "message": text}

`deadline_ms` is how long the client will wait, counted from when it sent the request;
the service does not start an element operation whose deadline has passed. Failures
travel as a kind from `FAILURE_KINDS`, so each side speaks the same ElementError family.
docs/grid-protocol.md describes every operation.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgpack

from grid_backend.secure_element import (
    ElementAbsent,
    ElementError,
    ElementFailure,
    InputRefused,
    KeyRefused,
    MechanismRefused,
    NotLoggedIn,
    PinIncorrect,
    PinInvalid,
    PinLocked,
)

VERSION: Final = 1
HEADER: Final = struct.Struct(">I")
MAX_MESSAGE: Final = 1 << 20  # far above any request: a signature input is a hash


class ElementRefused(ElementError):
    """The grid does not let this caller use this element (policy, not a fault)."""


class SessionUnknown(ElementError):
    """The grid has no such session (it restarted, or the session was dropped).

    Nothing was done: the client logs in again and repeats the request.
    """


class IdentityRefused(ElementRefused):
    """The grid refused the caller's identity tokens; the message names the failed check."""


class AuthorizationNeeded(SessionUnknown):
    """No valid authorization for this element (none yet, or it expired with its tokens).

    Nothing was done: the client presents fresh identity tokens and repeats the request.
    """


class DeadlineExceeded(ElementFailure):
    """The reply did not come within the request's deadline."""


class ProtocolViolation(ElementFailure):
    """A message that does not follow this protocol."""


FAILURE_KINDS: Final[dict[str, type[ElementError]]] = {
    "pin-incorrect": PinIncorrect,
    "pin-locked": PinLocked,
    "pin-invalid": PinInvalid,
    "not-logged-in": NotLoggedIn,
    "absent": ElementAbsent,
    "failure": ElementFailure,
    "mechanism": MechanismRefused,
    "input": InputRefused,
    "key": KeyRefused,
    "refused": ElementRefused,
    "identity": IdentityRefused,
    "session-unknown": SessionUnknown,
    "authorization-needed": AuthorizationNeeded,
    "deadline": DeadlineExceeded,
    "protocol": ProtocolViolation,
}


def failure_kind(failure: ElementError) -> str:
    """The most specific kind for a failure (subclasses before their parents)."""
    for kind, family in FAILURE_KINDS.items():
        if type(failure) is family:
            return kind
    for kind, family in FAILURE_KINDS.items():
        if isinstance(failure, family):
            return kind
    return "failure"


def failure_from(body: dict[str, Any]) -> ElementError:
    family = FAILURE_KINDS.get(str(body.get("error")), ElementFailure)
    return family(str(body.get("message", "")))


def encode(message: list[Any]) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    if len(payload) > MAX_MESSAGE:
        raise ProtocolViolation(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE}")
    return HEADER.pack(len(payload)) + payload


def decode(payload: bytes) -> list[Any]:
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolViolation(f"undecodable message: {exc}") from None
    if not isinstance(message, list) or len(message) not in (3, 4):
        raise ProtocolViolation("a message is an array of 3 or 4 items")
    return message


def frame_length(header: bytes | bytearray | memoryview) -> int:
    """The payload length a frame's first 4 bytes announce (more bytes may follow them)."""
    (length,) = HEADER.unpack_from(header)
    if length > MAX_MESSAGE:
        raise ProtocolViolation(f"frame of {length} bytes exceeds {MAX_MESSAGE}")
    return int(length)
