"""APDU transports: PC/SC (pyscard) and RACS."""
