"""Clearing this thread's OpenSSL error queue before our own TLS calls.

Python's ssl module shares libcrypto with everything else in the process: the host of
the PKCS#11 module (openssl, nginx) and the secure elements of the grid (SoftHSM2 leaves
"no such engine" behind when it probes for engines). A stale entry makes SSL_get_error()
report a TLS read that merely has to wait as a fatal error, and Python's ssl module does
not clear the queue first, as OpenSSL asks callers to. So both ends of the grid protocol
clear it before every TLS call that may have to wait.
"""

from __future__ import annotations

from typing import Any

_clear: Any = None


def clear_thread_errors() -> None:
    global _clear
    if _clear is None:
        import ctypes
        import ctypes.util
        import ssl

        name = "libcrypto.so.3" if ssl.OPENSSL_VERSION_INFO[0] == 3 else \
            ctypes.util.find_library("crypto")
        # PyDLL: a call this short must not release and re-take the GIL (a contended
        # hand-off costs more than the call).
        function = ctypes.PyDLL(name).ERR_clear_error
        function.argtypes, function.restype = (), None
        _clear = function
    _clear()
