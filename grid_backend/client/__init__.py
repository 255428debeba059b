"""The grid client library: a pool of TLS connections to the grid service, and a
SecureElement that lives behind it (what the PKCS#11 module's grid backend uses)."""

from grid_backend.client.pool import AwaitReadable, GridPool, GridSettings, GridUnreachable
from grid_backend.client.remote import RemoteElement

__all__ = ["AwaitReadable", "GridPool", "GridSettings", "GridUnreachable", "RemoteElement"]
