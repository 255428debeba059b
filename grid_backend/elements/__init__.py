"""Secure-element drivers: one class per kind of element, all behind grid_backend.secure_element.

`open_element` builds the driver a registry record names; the import happens only then, so
a process that never drives a kind of element never loads its libraries.
"""

from __future__ import annotations

from typing import Any

from grid_backend.secure_element import ElementFailure, SecureElement

DRIVERS = ("pkcs11", "piv")


def open_element(driver: str, settings: dict[str, Any]) -> SecureElement:
    """The driver for one element, not yet opened."""
    if driver == "pkcs11":
        from grid_backend.elements.pkcs11_token import Pkcs11Token

        return Pkcs11Token(settings["library"], settings["token_label"],
                           settings.get("environment", {}))
    if driver == "piv":
        from grid_backend.elements.piv_card import open_piv_card

        return open_piv_card(settings)
    raise ElementFailure(f"no driver {driver!r} (known: {', '.join(DRIVERS)})")
