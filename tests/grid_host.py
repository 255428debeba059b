"""A long-running application using libp11grid.so (through python-pkcs11), driven line by
line on stdin so that a test can restart, stall or kill the grid between its operations.

Commands: `sign` (ECDSA with vm-ec, verified), `find` (a FindObjects), `exit`.
Each answer is one line: `ok <seconds>` or `error <exception class> <seconds>`.
"""

from __future__ import annotations

import os
import sys
import time

import pkcs11
from pkcs11 import Mechanism, ObjectClass


def main() -> None:
    lib = pkcs11.lib(os.environ["P11GRID_MODULE"])
    token = lib.get_token(token_label=os.environ["P11GRID_TOKEN"])
    session = token.open(user_pin=os.environ["P11GRID_PIN"])
    key = session.get_key(ObjectClass.PRIVATE_KEY, label="vm-ec")
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "exit":
            break
        started = time.monotonic()
        try:
            if command == "sign":
                signature = key.sign(b"grid host", mechanism=Mechanism.ECDSA_SHA256)
                assert len(signature) == 64
            elif command == "find":
                assert list(session.get_objects({pkcs11.Attribute.LABEL: "vm-ec"}))
            answer = "ok"
        except pkcs11.exceptions.PKCS11Error as exc:
            answer = f"error {type(exc).__name__}"
        print(f"{answer} {time.monotonic() - started:.3f}", flush=True)


if __name__ == "__main__":
    main()
