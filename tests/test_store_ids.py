"""Result ids are numbered per kind (graphs share one sequence), and an old database keeps its
ids when it gains the per-kind columns."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from spd_mcp.service.store import AppStore


def test_each_kind_numbers_its_own_results(tmp_path: Path) -> None:
    async def main() -> None:
        st = await AppStore.open(tmp_path / "app.db")
        assert await st.put_result("edit", {"a": 1}, {"n": 1}) == 1
        assert await st.put_result("intervention", {"a": 1}, {}) == 1
        assert await st.put_result("graph", {"a": 1}, {}, b"g") == 1
        assert await st.put_result("optimized_graph", {"a": 1}, {}, b"o") == 2  # shared ids
        assert await st.put_result("intervention", {"a": 2}, {}) == 2
        assert await st.put_result("edit", {"a": 2}, {"n": 2}) == 2  # no jump
        assert await st.put_result("edit", {"a": 1}, {"n": 9}) == 1  # same params: same row
        row = await st.get_result("edit", 2)
        assert row is not None and row[1] == {"n": 2}
        assert await st.get_result("optimized_graph", 2) is not None
        assert await st.get_result("graph", 2) is None
        assert [i for i, _ in await st.list_results("edit")] == [2, 1]
        await st.close()

    asyncio.run(main())


def test_an_old_database_keeps_its_ids(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE results (id INTEGER PRIMARY KEY, kind TEXT NOT NULL,
            params_hash TEXT NOT NULL, params TEXT NOT NULL, prompt_id INTEGER,
            summary TEXT NOT NULL, payload BLOB, created REAL NOT NULL,
            UNIQUE(kind, params_hash));
        INSERT INTO results VALUES (4, 'edit', 'h1', '{}', NULL, '{"n": 4}', NULL, 0);
        INSERT INTO results VALUES (6, 'graph', 'h2', '{}', NULL, '{}', x'00', 0);
    """)
    con.commit()
    con.close()

    async def main() -> None:
        st = await AppStore.open(db)
        row = await st.get_result("edit", 4)
        assert row is not None and row[1] == {"n": 4}
        assert await st.put_result("edit", {"b": 1}, {}) == 5
        assert await st.put_result("optimized_graph", {"b": 1}, {}, b"x") == 7
        await st.close()

    asyncio.run(main())
