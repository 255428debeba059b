"""An application signing through libp11grid.so while the test kills a grid node under it.

Threads sign with the key labelled $NODES_KEY_LABEL (ECDSA P-256) in the token labelled
$P11GRID_TOKEN; one more thread asks for random bytes (an idempotent request, retried on
the next node by the module). Every loop is bounded in count and in time. The host prints
`ready` once every thread has signed once. On stdin, `mark` notes each thread's count (the
test says it right after the kill) and `stop` ends the run (so does the host's own
deadline); then it prints one JSON report: {"signed": [per thread], "marked": [per thread
at the mark], "failed": [[thread, seconds since start, error], ...], "random": n,
"random_failed": [...], "bad_signatures": n, "mark_at": seconds since start}.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11 import Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key

THREADS = int(os.environ.get("NODES_THREADS", "4"))
MAX_SECONDS = 60.0  # the host's own deadline, whatever the test does
MAX_OPERATIONS = 200_000  # per thread


def main() -> None:
    lib = pkcs11.lib(os.environ["P11GRID_MODULE"])
    token = lib.get_token(token_label=os.environ["P11GRID_TOKEN"])
    label = os.environ["NODES_KEY_LABEL"]
    holder = token.open(user_pin=os.environ["P11GRID_PIN"])
    public = load_der_public_key(encode_ec_public_key(
        holder.get_key(ObjectClass.PUBLIC_KEY, label=label)))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    stop = threading.Event()
    started = time.monotonic()
    deadline = started + MAX_SECONDS
    signed = [0] * THREADS
    failed: list[list[Any]] = []
    random_failed: list[list[Any]] = []
    counts = {"random": 0, "bad_signatures": 0}
    lock = threading.Lock()
    first = threading.Barrier(THREADS + 2)

    def sign(index: int) -> None:
        with token.open() as session:
            key = session.get_key(ObjectClass.PRIVATE_KEY, label=label)
            waited = False
            for n in range(MAX_OPERATIONS):
                if stop.is_set() or time.monotonic() > deadline:
                    break
                message = f"thread {index} signature {n}".encode()
                try:
                    signature = key.sign(message, mechanism=Mechanism.ECDSA_SHA256)
                except pkcs11.exceptions.PKCS11Error as exc:
                    with lock:
                        failed.append([index, round(time.monotonic() - started, 3),
                                       type(exc).__name__])
                    continue
                half = len(signature) // 2
                try:
                    public.verify(utils.encode_dss_signature(
                        int.from_bytes(signature[:half], "big"),
                        int.from_bytes(signature[half:], "big")),
                        message, ec.ECDSA(hashes.SHA256()))
                except InvalidSignature:
                    with lock:
                        counts["bad_signatures"] += 1
                signed[index] += 1
                if not waited:
                    waited = True
                    first.wait(timeout=30)

    def randomness() -> None:
        with token.open() as session:
            waited = False
            for _ in range(MAX_OPERATIONS):
                if stop.is_set() or time.monotonic() > deadline:
                    break
                try:
                    assert len(session.generate_random(256)) == 32
                    with lock:
                        counts["random"] += 1
                except pkcs11.exceptions.PKCS11Error as exc:
                    with lock:
                        random_failed.append([round(time.monotonic() - started, 3),
                                              type(exc).__name__])
                if not waited:
                    waited = True
                    first.wait(timeout=30)
                time.sleep(0.002)

    workers = [threading.Thread(target=sign, args=(i,)) for i in range(THREADS)]
    workers.append(threading.Thread(target=randomness))
    for worker in workers:
        worker.start()
    first.wait(timeout=30)
    print("ready", flush=True)
    marked: list[int] = []
    mark_at = [0.0]

    def listen() -> None:
        for line in sys.stdin:
            if line.strip() == "mark":
                marked[:] = list(signed)
                mark_at[0] = round(time.monotonic() - started, 3)
            elif line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=listen, daemon=True).start()
    for worker in workers:
        worker.join(timeout=MAX_SECONDS + 10)
    holder.close()
    print(json.dumps({"signed": signed, "marked": marked, "mark_at": mark_at[0],
                      "failed": failed, "random_failed": random_failed, **counts}), flush=True)


if __name__ == "__main__":
    main()
