"""SQLite verdict cache (WAL), safe with concurrent writers (threads and processes), re-used on resume.

Key: sha256 over (judge identity, prompt-template version, criterion, prompt, normalized response,
reference). The judge identity names the model and its settings but never an API key. The response is
normalized by removing ``<think>`` blocks and surrounding whitespace. Only successful verdicts are stored:
a failure is retried next time, never served from the cache.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from rubric_fast.judges.base import Verdict, strip_think
from rubric_fast.judges.prompts import TEMPLATE_VERSION

_SCHEMA = """CREATE TABLE IF NOT EXISTS verdicts (
    key TEXT PRIMARY KEY, judge TEXT NOT NULL, template TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL)"""


def criterion_fingerprint(c) -> dict:
    return {"id": c.id, "text": c.text, "verifier": c.verifier, "params": c.verifier_params,
            "tiers": [(t.score, t.description) for t in c.tiers] if c.tiers else None}


def cache_key(judge_identity: str, criteria, prompt, response: str, reference: str | None,
              template: str = TEMPLATE_VERSION) -> str:
    """One key per criterion (pass one criterion) or per holistic request (pass them all)."""
    if not isinstance(criteria, (list, tuple)):
        criteria = [criteria]
    blob = json.dumps([judge_identity, template, [criterion_fingerprint(c) for c in criteria], prompt,
                       strip_think(response), reference], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class VerdictCache:
    def __init__(self, path: str | Path, *, timeout_s: float = 30.0):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=timeout_s, check_same_thread=False, isolation_level=None)
        self._db.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self.hits = self.misses = self.writes = 0

    def get(self, key: str) -> list[Verdict] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM verdicts WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return [Verdict(cid, score, reason, None, cached=True) for cid, score, reason in json.loads(row[0])]

    def put(self, key: str, verdicts: list[Verdict], *, judge: str = "", template: str = TEMPLATE_VERSION) -> bool:
        if not verdicts or any(v.score is None or v.guarded for v in verdicts):
            return False
        value = json.dumps([(v.criterion_id, v.score, v.reason) for v in verdicts], ensure_ascii=False)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO verdicts (key, judge, template, value, created) "
                             "VALUES (?, ?, ?, ?, ?)", (key, judge, template, value, time.time()))
        self.writes += 1
        return True

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
