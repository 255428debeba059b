"""RACS: remote APDU access to secure elements over mutual TLS (draft-urien-core-racs)."""
