"""Who may use which secure element over RACS, and which APDUs they may send it.

RACS authorizes by the CN of the client certificate (the TLS layer has already verified
the certificate against the configured CA). An `Authorizer` answers three questions; the
grid service later plugs in one backed by its registry, the RACS server's config file
gives a `TableAuthorizer`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal


class _All(enum.Enum):
    ALL = "all"


ALL: Final = _All.ALL  # "this CN may use every element"
SeidSet = set[str] | Literal[_All.ALL]


class Authorizer:
    """The authorization a RACS server consults. Override `allowed`; the rest default open."""

    def allowed(self, cn: str) -> SeidSet:
        """The SEIDs the holder of this CN may use, or ALL."""
        raise NotImplementedError

    def apdu_allowed(self, cn: str, seid: str, header: bytes) -> bool:
        """May this CN send an APDU with this 4-byte header (CLA INS P1 P2) to seid?"""
        return True

    def aid_allowed(self, cn: str, seid: str, aid: bytes) -> bool:
        """May this CN SELECT this application on seid? Only after such a SELECT does the
        server let other APDUs through."""
        return True

    def may_use(self, cn: str, seid: str) -> bool:
        seids = self.allowed(cn)
        return seids is ALL or seid in seids


@dataclass(frozen=True, slots=True)
class ApduFilter:
    """Refuses an APDU when header & mask == value (as the author's filter files do).

    The CLA's logical-channel bits are cleared before matching, so a filter written for
    channel 0 covers every channel.
    """

    mask: bytes
    value: bytes

    def __post_init__(self) -> None:
        if len(self.mask) != 4 or len(self.value) != 4:
            raise ValueError("an APDU filter has a 4-byte mask and a 4-byte value")

    def refuses(self, header: bytes) -> bool:
        header = bytes([header[0] & 0xFC]) + header[1:4]
        return all((h & m) == v for h, m, v in zip(header, self.mask, self.value, strict=True))

    @classmethod
    def parse(cls, mask: str, value: str) -> ApduFilter:
        return cls(bytes.fromhex(mask), bytes.fromhex(value))


# Ready-made filters for the commands one usually keeps away from remote callers.
FORBID_VERIFY: Final = ApduFilter(b"\xff\xff\x00\x00", b"\x00\x20\x00\x00")
FORBID_PUT_KEY: Final = ApduFilter(b"\x00\xff\x00\x00", b"\x00\xd8\x00\x00")


@dataclass(slots=True)
class ElementRule:
    """Per (CN, SEID) policy: filters refusing headers, and the AIDs that may be selected
    (None: any AID)."""

    filters: list[ApduFilter] = field(default_factory=list)
    aids: set[bytes] | None = None


WILDCARD = "*"


@dataclass(slots=True)
class TableAuthorizer(Authorizer):
    """Authorization from tables: CN -> SEIDs (or ALL), and (CN, SEID) -> ElementRule.

    A rule keyed with "*" as CN or SEID applies to every CN or SEID; all matching rules
    apply (filters add up; AID sets intersect).
    """

    users: dict[str, SeidSet] = field(default_factory=dict)
    rules: dict[tuple[str, str], ElementRule] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, users: Mapping[str, Iterable[str] | str],
                     rules: Iterable[Mapping[str, object]] = ()) -> TableAuthorizer:
        table: dict[str, SeidSet] = {}
        for cn, seids in users.items():
            if isinstance(seids, str):
                if seids != "all":
                    raise ValueError(f"CN {cn!r}: seids is a list or \"all\", not {seids!r}")
                table[cn] = ALL
            else:
                table[cn] = {str(seid) for seid in seids}
        authorizer = cls(table)
        for rule in rules:
            authorizer.add_rule(rule)
        return authorizer

    def add_rule(self, rule: Mapping[str, object]) -> None:
        cn = str(rule.get("cn", WILDCARD))
        seid = str(rule.get("seid", WILDCARD))
        target = self.rules.setdefault((cn, seid), ElementRule())
        deny = rule.get("deny", [])
        if not isinstance(deny, list):
            raise ValueError("filter deny is a list of {mask, value} tables")
        for item in deny:
            if not isinstance(item, Mapping):
                raise ValueError("filter deny is a list of {mask, value} tables")
            target.filters.append(ApduFilter.parse(str(item["mask"]), str(item["value"])))
        aids = rule.get("aids")
        if aids is not None:
            if not isinstance(aids, list):
                raise ValueError("filter aids is a list of hex AIDs")
            target.aids = {bytes.fromhex(str(aid)) for aid in aids}

    def allowed(self, cn: str) -> SeidSet:
        return self.users.get(cn, set())

    def _rules(self, cn: str, seid: str) -> list[ElementRule]:
        keys = ((cn, seid), (cn, WILDCARD), (WILDCARD, seid), (WILDCARD, WILDCARD))
        return [self.rules[key] for key in keys if key in self.rules]

    def apdu_allowed(self, cn: str, seid: str, header: bytes) -> bool:
        return not any(f.refuses(header) for rule in self._rules(cn, seid) for f in rule.filters)

    def aid_allowed(self, cn: str, seid: str, aid: bytes) -> bool:
        return all(rule.aids is None or aid in rule.aids for rule in self._rules(cn, seid))
