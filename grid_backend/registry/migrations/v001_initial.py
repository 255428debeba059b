"""Version 1: the registry's schema as it was before versioned migrations (SQLite files
made then carry PRAGMA user_version 1 and exactly these tables)."""

from __future__ import annotations

from grid_backend.registry.migrations import Step

SCHEMA = """
CREATE TABLE IF NOT EXISTS secure_element (
    seid TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    driver TEXT NOT NULL,
    settings TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS binding (
    identity TEXT NOT NULL,
    seid TEXT NOT NULL REFERENCES secure_element(seid) ON DELETE CASCADE,
    created TEXT NOT NULL,
    PRIMARY KEY (identity, seid)
);
CREATE TABLE IF NOT EXISTS element_key (
    seid TEXT NOT NULL REFERENCES secure_element(seid) ON DELETE CASCADE,
    label TEXT NOT NULL,
    key_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (seid, label)
);
CREATE TABLE IF NOT EXISTS administrator (
    identity TEXT NOT NULL,
    seid TEXT NOT NULL REFERENCES secure_element(seid) ON DELETE CASCADE,
    PRIMARY KEY (identity, seid)
);
"""


def upgrade(step: Step) -> None:
    step.script(SCHEMA)
