"""Version 2: grid nodes, identities, revocations, the jti replay cache and the audit table.

- `secure_element` gains `node` (the grid node hosting that placement) and is keyed by
  (seid, node): one element may be placed on several nodes. Bindings, keys and
  administrators stay keyed by seid, for every placement; since seid alone is no longer a
  key of `secure_element`, their foreign keys to it go (the registry checks that the seid
  exists when it binds or adds an administrator).
- `identity`: every identity ever bound, with its kind (filled from today's bindings).
- `revocation`: certificate serials (hex) the grid refuses at once, on every node.
- `replay`: access-token jtis seen, until their token expires (plus leeway).
- `audit`: one row per audited operation, written in batches beside the audit file.
"""

from __future__ import annotations

from grid_backend.registry.core import identity_kind
from grid_backend.registry.migrations import Step

# SQLite cannot change a primary key or drop a foreign key in place: each table is
# rebuilt under its own name (the migration runs with foreign_keys off, as SQLite's
# documented table-rebuild procedure requires).
SQLITE_REBUILD = """
CREATE TABLE secure_element_v2 (
    seid TEXT NOT NULL,
    label TEXT NOT NULL,
    driver TEXT NOT NULL,
    settings TEXT NOT NULL,
    created TEXT NOT NULL,
    node TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (seid, node)
);
INSERT INTO secure_element_v2 (seid, label, driver, settings, created, node)
    SELECT seid, label, driver, settings, created, '' FROM secure_element;
CREATE TABLE binding_v2 (
    identity TEXT NOT NULL,
    seid TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (identity, seid)
);
INSERT INTO binding_v2 (identity, seid, created) SELECT identity, seid, created FROM binding;
CREATE TABLE element_key_v2 (
    seid TEXT NOT NULL,
    label TEXT NOT NULL,
    key_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (seid, label)
);
INSERT INTO element_key_v2 (seid, label, key_id, kind, created)
    SELECT seid, label, key_id, kind, created FROM element_key;
CREATE TABLE administrator_v2 (
    identity TEXT NOT NULL,
    seid TEXT NOT NULL,
    PRIMARY KEY (identity, seid)
);
INSERT INTO administrator_v2 (identity, seid) SELECT identity, seid FROM administrator;
DROP TABLE binding;
DROP TABLE element_key;
DROP TABLE administrator;
DROP TABLE secure_element;
ALTER TABLE secure_element_v2 RENAME TO secure_element;
ALTER TABLE binding_v2 RENAME TO binding;
ALTER TABLE element_key_v2 RENAME TO element_key;
ALTER TABLE administrator_v2 RENAME TO administrator
"""

# Dropping the primary key with CASCADE drops the three foreign keys that depend on it.
POSTGRES_NODES = """
ALTER TABLE secure_element ADD COLUMN node TEXT NOT NULL DEFAULT '';
ALTER TABLE secure_element DROP CONSTRAINT secure_element_pkey CASCADE;
ALTER TABLE secure_element ADD PRIMARY KEY (seid, node)
"""

NEW_TABLES = """
CREATE TABLE identity (
    uri TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    enrolled TEXT NOT NULL
);
CREATE TABLE revocation (
    serial TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    reason TEXT NOT NULL,
    revoked TEXT NOT NULL
);
CREATE TABLE replay (
    jti TEXT PRIMARY KEY,
    expires {real} NOT NULL
);
CREATE INDEX replay_expires ON replay (expires);
CREATE TABLE audit (
    id {serial},
    at TEXT NOT NULL,
    node TEXT NOT NULL,
    who TEXT NOT NULL,
    seid TEXT NOT NULL,
    key TEXT,
    mechanism BIGINT,
    operation TEXT NOT NULL,
    result TEXT NOT NULL,
    duration_ms {real} NOT NULL
);
CREATE INDEX audit_at ON audit (at)
"""


def upgrade(step: Step) -> None:
    if step.dialect == "sqlite":
        step.script(SQLITE_REBUILD)
        step.script(NEW_TABLES.format(real="REAL",
                                      serial="INTEGER PRIMARY KEY AUTOINCREMENT"))
    else:
        step.script(POSTGRES_NODES)
        step.script(NEW_TABLES.format(real="DOUBLE PRECISION",
                                      serial="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"))
    for identity, enrolled in step.run("SELECT identity, MIN(created) FROM binding "
                                       "GROUP BY identity"):
        step.run("INSERT INTO identity (uri, kind, enrolled) VALUES (?, ?, ?)",
                 (identity, identity_kind(identity), enrolled))
