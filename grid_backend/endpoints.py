"""`host:port`, the one way p11grid's configs name a network peer (IPv6 in brackets)."""

from __future__ import annotations


def parse_endpoint(text: str, default_port: int | None = None) -> tuple[str, int]:
    """(host, port) from "host:port"; ValueError with the reason if it is not one."""
    host, separator, port = str(text).rpartition(":")
    if not separator and default_port is not None:
        return str(text).strip("[]"), default_port
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)
