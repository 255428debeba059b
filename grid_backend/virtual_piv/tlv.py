"""BER-TLV as PIV uses it: tags of one to three bytes, definite lengths up to 3 bytes."""

from __future__ import annotations


def encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    size = (length.bit_length() + 7) // 8
    return bytes([0x80 | size]) + length.to_bytes(size, "big")


def tag_bytes(tag: int) -> bytes:
    return tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")


def tlv(tag: int, value: bytes) -> bytes:
    return tag_bytes(tag) + encode_length(len(value)) + value


def parse(data: bytes) -> list[tuple[int, bytes]]:
    """The TLVs of one level, in order. Raises ValueError on malformed input."""
    items: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        if data[i] in (0x00, 0xFF):  # padding between objects, as ISO 7816-4 allows
            i += 1
            continue
        tag = data[i]
        i += 1
        if tag & 0x1F == 0x1F:  # multi-byte tag: continuation bytes have bit 8 set
            while True:
                if i >= len(data):
                    raise ValueError("truncated tag")
                tag = (tag << 8) | data[i]
                i += 1
                if not data[i - 1] & 0x80:
                    break
        if i >= len(data):
            raise ValueError("missing length")
        length = data[i]
        i += 1
        if length & 0x80:
            size = length & 0x7F
            if size == 0 or size > 3 or i + size > len(data):
                raise ValueError("bad length")
            length = int.from_bytes(data[i:i + size], "big")
            i += size
        if i + length > len(data):
            raise ValueError("value runs past the end")
        items.append((tag, data[i:i + length]))
        i += length
    return items


def parse_map(data: bytes) -> dict[int, bytes]:
    """One level of TLVs by tag (the first of each tag wins)."""
    found: dict[int, bytes] = {}
    for tag, value in parse(data):
        found.setdefault(tag, value)
    return found
