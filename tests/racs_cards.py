"""A tiny deterministic card for the RACS tests, as an ApduTransport.

It knows one application (TEST_AID) and answers:
- SELECT by AID (00 A4 04 00): 9000 for TEST_AID, 6A82 otherwise;
- INS CA: echoes its data field, 9000;
- INS CB: 300 bytes of data through 61xx + GET RESPONSE (any CLA, INS C0);
- INS B0 with Le: 6C10 unless Le is 0x10, then 16 bytes and 9000;
- INS 20 (VERIFY): 6982;
- INS ED: raises TransportFailure; INS EE: hangs until `release` is set (a stuck card);
  INS EF: raises RuntimeError (a bug in a driver);
- anything else: 6D00.
"""

from __future__ import annotations

import threading

from grid_backend.apdu import TransportFailure

TEST_AID = bytes.fromhex("F0504731314752494401")  # made up, proprietary range F0...
OTHER_AID = bytes.fromhex("F0504731314752494402")
LONG_DATA = bytes(range(256)) + bytes(range(44))
TEST_ATR = bytes.fromhex("3B8F8001804F0CA000000306030001000000006A")


class TestCard:
    """A deterministic in-memory card; every APDU it receives is kept in `apdus`."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "test card", warm_reset: bool = True):
        self.name = name
        self.warm_reset = warm_reset
        self.powered = False
        self.apdus: list[bytes] = []
        self.release = threading.Event()
        self._pending = b""

    def connect(self) -> bytes:
        self.powered = True
        self._pending = b""
        return TEST_ATR

    def reset(self, warm: bool = True) -> bytes:
        if warm and not self.warm_reset:
            raise NotImplementedError("this test card has no warm reset")
        self._pending = b""
        return TEST_ATR

    def disconnect(self) -> None:
        self.powered = False

    def transmit(self, apdu: bytes) -> bytes:
        self.apdus.append(apdu)
        ins, p1 = apdu[1], apdu[2]
        data = apdu[5:5 + apdu[4]] if len(apdu) > 5 else b""
        if ins == 0xA4 and p1 == 0x04:
            return b"\x90\x00" if data == TEST_AID else b"\x6a\x82"
        if ins == 0xCA:
            return data + b"\x90\x00"
        if ins == 0xCB:
            self._pending = LONG_DATA
            return b"\x61\x00"
        if ins == 0xC0:
            wanted = apdu[4] or 256
            chunk, self._pending = self._pending[:wanted], self._pending[wanted:]
            if self._pending:
                return chunk + bytes([0x61, min(len(self._pending), 256) & 0xFF])
            return chunk + b"\x90\x00"
        if ins == 0xB0:
            if len(apdu) != 5 or apdu[4] != 0x10:
                return b"\x6c\x10"
            return bytes(range(16)) + b"\x90\x00"
        if ins == 0x20:
            return b"\x69\x82"
        if ins == 0xED:
            raise TransportFailure("reader unplugged")
        if ins == 0xEE:
            self.release.wait(30)
            return b"\x90\x00"
        if ins == 0xEF:
            raise RuntimeError("driver bug")
        return b"\x6d\x00"
