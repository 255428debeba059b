"""The grid side: secure-element drivers, APDU transports, the grid service and its client."""
