"""A PKCS#11 session: its token, its RO/RW flag and its operations in progress."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from provider.constants import (
    CKF_RW_SESSION,
    CKF_SERIAL_SESSION,
    CKS_RO_PUBLIC_SESSION,
    CKS_RO_USER_FUNCTIONS,
    CKS_RW_PUBLIC_SESSION,
    CKS_RW_USER_FUNCTIONS,
)
from provider.operations import (
    DecryptOperation,
    DigestOperation,
    FindOperation,
    SignOperation,
    VerifyOperation,
)
from provider.token import Token


@dataclass(eq=False)
class Session:
    handle: int
    token: Token
    read_write: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    find: FindOperation | None = None
    sign: SignOperation | None = None
    verify: VerifyOperation | None = None
    decrypt: DecryptOperation | None = None
    digest: DigestOperation | None = None

    @property
    def state(self) -> int:
        if self.token.logged_in:
            return CKS_RW_USER_FUNCTIONS if self.read_write else CKS_RO_USER_FUNCTIONS
        return CKS_RW_PUBLIC_SESSION if self.read_write else CKS_RO_PUBLIC_SESSION

    @property
    def flags(self) -> int:
        return CKF_SERIAL_SESSION | (CKF_RW_SESSION if self.read_write else 0)
