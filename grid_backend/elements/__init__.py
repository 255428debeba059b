"""Secure-element drivers: one class per kind of element, all behind grid_backend.secure_element."""
