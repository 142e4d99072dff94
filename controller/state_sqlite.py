"""Embedded SQLite state store: the default on one machine, nothing to run besides the controller.

sqlite3 is synchronous, so every statement runs on one dedicated thread: the event loop never
blocks on disk, and a single thread needs no locking around the connection. WAL mode makes the
frequent small writes (heartbeats) cheap and lets readers in other processes (a second
controller reading the same file for a restart test) see committed data.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from ember.controller.state import StateStore, StoreUnavailable

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    kind  TEXT NOT NULL,
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (kind, key)
)
"""


class SqliteStore(StateStore):
    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor, path: str) -> None:
        self._conn = conn
        self._executor = executor
        self.path = path

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-sqlite")

        def connect() -> sqlite3.Connection:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(SCHEMA)
            return conn

        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, connect)
        except (OSError, sqlite3.Error) as exc:
            executor.shutdown(wait=False)
            raise StoreUnavailable(
                f"cannot open the SQLite state store {path}: {exc}",
                "check the directory exists and is writable, or pass --state sqlite:///OTHER/PATH",
            ) from exc
        return cls(conn, executor, path)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _put(self, kind: str, key: str, value: str) -> None:
        await self._run(
            self._conn.execute,
            "INSERT INTO records(kind, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT(kind, key) DO UPDATE SET value = excluded.value",
            (kind, key, value),
        )

    async def _put_new(self, kind: str, key: str, value: str) -> bool:
        def insert() -> bool:
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO records(kind, key, value) VALUES (?, ?, ?)", (kind, key, value)
            )
            return cur.rowcount == 1

        return await self._run(insert)

    async def _get(self, kind: str, key: str) -> str | None:
        def get() -> str | None:
            row = self._conn.execute("SELECT value FROM records WHERE kind = ? AND key = ?", (kind, key)).fetchone()
            return None if row is None else row[0]

        return await self._run(get)

    async def _all(self, kind: str) -> list[str]:
        def all_() -> list[str]:
            return [r[0] for r in self._conn.execute("SELECT value FROM records WHERE kind = ?", (kind,))]

        return await self._run(all_)

    async def _delete(self, kind: str, key: str) -> bool:
        def delete() -> bool:
            return self._conn.execute("DELETE FROM records WHERE kind = ? AND key = ?", (kind, key)).rowcount == 1

        return await self._run(delete)

    async def close(self) -> None:
        await self._run(self._conn.close)
        self._executor.shutdown(wait=True)
