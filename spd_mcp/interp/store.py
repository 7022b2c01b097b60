"""Labels and label scores of a run: SQLite (WAL) at ``$SPD_MCP_HOME/runs/<run_id>/labels``.

A stage is one labelling pass with one configuration (``stage_id = kind-confighash``); rows are
written one transaction each, so a killed run loses at most the answers in flight. Only "ok" and
"failed" rows count as finished: "skipped" rows (budget, open circuit) are retried on resume.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from spd_mcp.paths import run_data_dir

from .client import CostLedger

# best_labels: lower rank wins; kinds not listed rank after these
KIND_RANK = {"graph_interp_unified": 0, "autointerp": 1}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stages (
    stage_id TEXT PRIMARY KEY, kind TEXT NOT NULL, config TEXT NOT NULL,
    created REAL NOT NULL, done REAL);
CREATE TABLE IF NOT EXISTS labels (
    stage_id TEXT NOT NULL, kind TEXT NOT NULL, component TEXT NOT NULL, status TEXT NOT NULL,
    label TEXT, confidence REAL, reasoning TEXT, related TEXT NOT NULL, error TEXT,
    cost_usd REAL NOT NULL, created REAL NOT NULL, PRIMARY KEY (stage_id, component));
CREATE INDEX IF NOT EXISTS labels_component ON labels (component);
CREATE TABLE IF NOT EXISTS scores (
    stage_id TEXT NOT NULL, component TEXT NOT NULL, method TEXT NOT NULL, score REAL NOT NULL,
    n_trials INTEGER NOT NULL, n_success INTEGER NOT NULL, details TEXT NOT NULL,
    PRIMARY KEY (stage_id, component, method));
CREATE TABLE IF NOT EXISTS ledgers (stage_id TEXT PRIMARY KEY, ledger TEXT NOT NULL);
"""


class LabelRow(BaseModel):
    """One component's label in one stage (or why it has none)."""

    stage_id: str
    kind: str
    component: str
    status: Literal["ok", "failed", "skipped"]
    label: str | None = None
    confidence: float | None = None
    reasoning: str | None = None
    related: list[str] = Field(default_factory=list)
    error: str | None = None
    cost_usd: float = 0.0
    created: float = Field(default_factory=time.time)


class ScoreRow(BaseModel):
    """How well one component's label predicts its firing (detection / fuzzing)."""

    stage_id: str
    component: str
    method: Literal["detection", "fuzzing"]
    score: float
    n_trials: int
    n_success: int
    details: dict[str, Any] = Field(default_factory=dict)


class StageInfo(BaseModel):
    stage_id: str
    kind: str
    config: dict[str, Any]
    created: float
    done: bool


def config_hash(config: dict[str, Any]) -> str:
    """Stable 16-hex hash of a JSON-able config."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def labels_path(run_id: str) -> Path:
    return run_data_dir(run_id) / "labels" / "labels.db"


class LabelStore:
    """The label database of one run (sync sqlite3; safe for several processes via WAL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    @classmethod
    def open(cls, run_id: str) -> LabelStore:
        return cls(labels_path(run_id))

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._db:  # one transaction (BEGIN ... COMMIT)
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(sql, params)

    # ----------------------------------------------------------------------------- stages
    def stage(self, kind: str, config: dict[str, Any]) -> str:
        """The stage id for ``kind`` and ``config`` (created if new)."""
        stage_id = f"{kind}-{config_hash(config)}"
        self._write("INSERT OR IGNORE INTO stages VALUES (?, ?, ?, ?, NULL)",
                    (stage_id, kind, json.dumps(config, sort_keys=True, default=str),
                     time.time()))
        return stage_id

    def stages(self, kind: str | None = None) -> list[StageInfo]:
        rows = self._db.execute(
            "SELECT * FROM stages WHERE ? IS NULL OR kind = ? ORDER BY created", (kind, kind))
        return [StageInfo(stage_id=r["stage_id"], kind=r["kind"], config=json.loads(r["config"]),
                          created=r["created"], done=r["done"] is not None) for r in rows]

    def is_done(self, stage_id: str) -> bool:
        r = self._db.execute("SELECT done FROM stages WHERE stage_id = ?", (stage_id,)).fetchone()
        return r is not None and r["done"] is not None

    def mark_done(self, stage_id: str) -> None:
        self._write("UPDATE stages SET done = ? WHERE stage_id = ?", (time.time(), stage_id))

    def finished(self, stage_id: str) -> set[str]:
        """Components with an "ok" or "failed" row (skipped ones are retried)."""
        rows = self._db.execute(
            "SELECT component FROM labels WHERE stage_id = ? AND status IN ('ok', 'failed')",
            (stage_id,))
        return {r["component"] for r in rows}

    # ----------------------------------------------------------------------------- labels
    def put_label(self, row: LabelRow) -> None:
        """Insert or replace one row, in its own transaction."""
        self._write(
            "INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.stage_id, row.kind, row.component, row.status, row.label, row.confidence,
             row.reasoning, json.dumps(row.related), row.error, row.cost_usd, row.created))

    @staticmethod
    def _label(r: sqlite3.Row) -> LabelRow:
        return LabelRow(**{**dict(r), "related": json.loads(r["related"])})

    def labels(self, stage_id: str) -> dict[str, LabelRow]:
        rows = self._db.execute("SELECT * FROM labels WHERE stage_id = ? ORDER BY rowid",
                                (stage_id,))
        return {r["component"]: self._label(r) for r in rows}

    def best_labels(self) -> dict[str, LabelRow]:
        """Per component the newest "ok" label of the best kind (unified graph-interp first)."""
        best: dict[str, LabelRow] = {}
        for r in self._db.execute("SELECT * FROM labels WHERE status = 'ok'"):
            row = self._label(r)
            cur = best.get(row.component)
            if cur is None or _rank(row) < _rank(cur):
                best[row.component] = row
        return best

    def search(self, text: str, limit: int = 20) -> list[LabelRow]:
        """Best labels containing ``text`` (case-insensitive), most confident first."""
        needle = text.casefold()
        hits = [r for r in self.best_labels().values()
                if needle in (r.label or "").casefold()]
        hits.sort(key=lambda r: (-(r.confidence or 0.0), r.component))
        return hits[:limit]

    # ----------------------------------------------------------------------------- scores
    def put_score(self, row: ScoreRow) -> None:
        self._write("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (row.stage_id, row.component, row.method, row.score, row.n_trials,
                     row.n_success, json.dumps(row.details)))

    def scores(self, stage_id: str) -> dict[str, ScoreRow]:
        rows = self._db.execute("SELECT * FROM scores WHERE stage_id = ? ORDER BY rowid",
                                (stage_id,))
        return {r["component"]: ScoreRow(**{**dict(r), "details": json.loads(r["details"])})
                for r in rows}

    # ----------------------------------------------------------------------------- ledger
    def put_ledger(self, stage_id: str, ledger: CostLedger) -> None:
        """Store the stage's (cumulative) ledger."""
        self._write("INSERT OR REPLACE INTO ledgers VALUES (?, ?)",
                    (stage_id, ledger.model_dump_json()))

    def ledger(self, stage_id: str) -> CostLedger | None:
        r = self._db.execute("SELECT ledger FROM ledgers WHERE stage_id = ?",
                             (stage_id,)).fetchone()
        return None if r is None else CostLedger.model_validate_json(r["ledger"])


def _rank(row: LabelRow) -> tuple[int, float]:
    return KIND_RANK.get(row.kind, len(KIND_RANK)), -row.created
