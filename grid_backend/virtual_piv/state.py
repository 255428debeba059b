"""What a virtual PIV card remembers across restarts: PIN, retry counter, keys, data objects.

One JSON file, `card.json`, in the state directory (mode 0700), written whole to a temporary
file (mode 0600) and renamed over the old one, so a crash leaves the old or the new card,
never half of one. Private keys are kept as unencrypted PKCS#8 PEM inside it: this is a test
card, and the file's mode is its only protection. The PIN is kept as a salted scrypt hash.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "card.json"
DEFAULT_PIN_RETRIES = 3


def _hash_pin(pin: bytes, salt: bytes) -> bytes:
    return hashlib.scrypt(pin, salt=salt, n=2**12, r=8, p=1, dklen=32)


@dataclass
class SlotKey:
    algorithm: int  # PIV algorithm identifier: 0x07 RSA-2048, 0x11 ECC P-256
    private_pem: bytes


@dataclass
class CardState:
    directory: Path
    pin_salt: bytes
    pin_hash: bytes
    pin_retries_left: int
    pin_max_retries: int
    management_key: bytes  # AES-192 (PIV algorithm 0x0A), for GENERATE and PUT DATA
    keys: dict[int, SlotKey] = field(default_factory=dict)
    objects: dict[int, bytes] = field(default_factory=dict)  # tag -> value inside 53 / 7E

    @staticmethod
    def exists(directory: Path) -> bool:
        return (directory / STATE_FILE).exists()

    @classmethod
    def create(cls, directory: Path, pin: str, management_key: bytes | None = None,
               retries: int = DEFAULT_PIN_RETRIES) -> CardState:
        salt = secrets.token_bytes(16)
        state = cls(directory=directory, pin_salt=salt,
                    pin_hash=_hash_pin(pin.encode(), salt), pin_retries_left=retries,
                    pin_max_retries=retries,
                    management_key=management_key or secrets.token_bytes(24))
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        state.save()
        return state

    @classmethod
    def load(cls, directory: Path) -> CardState:
        raw: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
        return cls(
            directory=directory,
            pin_salt=bytes.fromhex(raw["pin_salt"]),
            pin_hash=bytes.fromhex(raw["pin_hash"]),
            pin_retries_left=int(raw["pin_retries_left"]),
            pin_max_retries=int(raw["pin_max_retries"]),
            management_key=bytes.fromhex(raw["management_key"]),
            keys={int(slot, 16): SlotKey(int(k["algorithm"]), k["private_pem"].encode())
                  for slot, k in raw["keys"].items()},
            objects={int(tag, 16): bytes.fromhex(v) for tag, v in raw["objects"].items()},
        )

    def pin_matches(self, pin: bytes) -> bool:
        return hmac.compare_digest(_hash_pin(pin, self.pin_salt), self.pin_hash)

    def set_pin(self, pin: bytes) -> None:
        self.pin_salt = secrets.token_bytes(16)
        self.pin_hash = _hash_pin(pin, self.pin_salt)

    def save(self) -> None:
        document = {
            "pin_salt": self.pin_salt.hex(),
            "pin_hash": self.pin_hash.hex(),
            "pin_retries_left": self.pin_retries_left,
            "pin_max_retries": self.pin_max_retries,
            "management_key": self.management_key.hex(),
            "keys": {f"{slot:02x}": {"algorithm": k.algorithm,
                                     "private_pem": k.private_pem.decode()}
                     for slot, k in self.keys.items()},
            "objects": {f"{tag:x}": value.hex() for tag, value in self.objects.items()},
        }
        target = self.directory / STATE_FILE
        temporary = self.directory / f".{STATE_FILE}.{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(json.dumps(document, indent=1).encode())
            file.flush()
            os.fsync(file.fileno())  # a retry counter must survive a power cut
        os.replace(temporary, target)
