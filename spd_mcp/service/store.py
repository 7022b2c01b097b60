"""The live app database (SQLite in WAL mode through aiosqlite): prompts, graphs, interventions.

Result ids are numbered per kind (graphs natural and optimised together), so edit 3 follows
edit 2 whatever else was stored in between.

Rows are get-or-create by parameters: a canonical JSON of the parameters is hashed, and a repeated
call with the same parameters returns the stored result instead of recomputing. Each write is one
transaction, so a crash never leaves a half-written row.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import aiosqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY,
    tokens TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    family TEXT,
    seq INTEGER,
    params_hash TEXT NOT NULL,
    params TEXT NOT NULL,
    prompt_id INTEGER REFERENCES prompts(id),
    summary TEXT NOT NULL,
    payload BLOB,
    created REAL NOT NULL,
    UNIQUE(kind, params_hash)
);
"""
INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS results_seq ON results (family, seq)"

FAMILIES = {"graph": "graph", "optimized_graph": "graph"}
"""Result kinds that share one id sequence (a graph id names natural and optimised graphs).
Every other kind numbers its own results 1, 2, 3, … so an id never jumps because another kind
of result was stored in between."""


def family(kind: str) -> str:
    return FAMILIES.get(kind, kind)


def params_hash(kind: str, params: dict[str, Any]) -> str:
    blob = json.dumps({"kind": kind, **params}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class AppStore:
    """Async access to one run's app database."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path

    @classmethod
    async def open(cls, path: Path) -> AppStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(SCHEMA)
        async with db.execute("PRAGMA table_info(results)") as cur:
            cols = {str(r[1]) for r in await cur.fetchall()}
        if "seq" not in cols:  # a database from before per-kind ids: old ids stay valid
            await db.execute("ALTER TABLE results ADD COLUMN family TEXT")
            await db.execute("ALTER TABLE results ADD COLUMN seq INTEGER")
        async with db.execute("SELECT DISTINCT kind FROM results WHERE seq IS NULL") as cur:
            for (kind,) in await cur.fetchall():
                await db.execute("UPDATE results SET family = ?, seq = id WHERE kind = ? AND seq "
                                 "IS NULL", (family(str(kind)), kind))
        await db.execute(INDEX)
        await db.commit()
        return cls(db, path)

    async def close(self) -> None:
        await self.db.close()

    # ----------------------------------------------------------------------------- prompts
    async def get_or_create_prompt(self, tokens: list[int], text: str) -> int:
        key = json.dumps(tokens)
        async with self.db.execute("SELECT id FROM prompts WHERE tokens = ?", (key,)) as cur:
            row = await cur.fetchone()
        if row is not None:
            return int(row[0])
        cur = await self.db.execute(
            "INSERT OR IGNORE INTO prompts (tokens, text, created) VALUES (?, ?, ?)",
            (key, text, time.time()),
        )
        await self.db.commit()
        if cur.lastrowid:
            return int(cur.lastrowid)
        return await self.get_or_create_prompt(tokens, text)

    async def get_prompt(self, prompt_id: int) -> tuple[list[int], str] | None:
        async with self.db.execute(
            "SELECT tokens, text FROM prompts WHERE id = ?", (prompt_id,)
        ) as cur:
            row = await cur.fetchone()
        return (json.loads(row[0]), str(row[1])) if row else None

    async def count_prompts(self) -> int:
        async with self.db.execute("SELECT COUNT(*) FROM prompts") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # ----------------------------------------------------------------------------- results
    async def find_result(
        self, kind: str, params: dict[str, Any]
    ) -> tuple[int, dict[str, Any], bytes | None] | None:
        h = params_hash(kind, params)
        async with self.db.execute(
            "SELECT seq, summary, payload FROM results WHERE kind = ? AND params_hash = ?",
            (kind, h)
        ) as cur:
            row = await cur.fetchone()
        return (int(row[0]), json.loads(row[1]), row[2]) if row else None

    async def put_result(
        self,
        kind: str,
        params: dict[str, Any],
        summary: dict[str, Any],
        payload: bytes | None = None,
        prompt_id: int | None = None,
    ) -> int:
        """Store a result (its id: the next number in its kind's sequence); if the same
        parameters were stored meanwhile, keep the first."""
        h = params_hash(kind, params)
        fam = family(kind)
        await self.db.execute(
            "INSERT OR IGNORE INTO results (kind, family, seq, params_hash, params, prompt_id, "
            "summary, payload, created) SELECT ?, ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ?, ?, ?, ? "
            "FROM results WHERE family = ?",
            (kind, fam, h, json.dumps(params, sort_keys=True), prompt_id, json.dumps(summary),
             payload, time.time(), fam),
        )
        await self.db.commit()
        found = await self.find_result(kind, params)
        assert found is not None
        return found[0]

    async def get_result(
        self, kind: str, result_id: int
    ) -> tuple[dict[str, Any], dict[str, Any], bytes | None, int | None] | None:
        """(params, summary, payload, prompt_id) of a stored result."""
        async with self.db.execute(
            "SELECT params, summary, payload, prompt_id FROM results WHERE kind = ? AND seq = ?",
            (kind, result_id),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return json.loads(row[0]), json.loads(row[1]), row[2], row[3]

    async def list_results(self, kind: str, limit: int = 50) -> list[tuple[int, dict[str, Any]]]:
        async with self.db.execute(
            "SELECT seq, summary FROM results WHERE kind = ? ORDER BY seq DESC LIMIT ?",
            (kind, limit)
        ) as cur:
            rows = await cur.fetchall()
        return [(int(r[0]), json.loads(r[1])) for r in rows]
