"""The quarantine folder: raw files the engine would not de-identify, with reasons.

It holds original (identifying) files, so it lives outside DST, is created
0700, and only ever receives copies: nothing in SRC is moved or modified.
``quarantine.jsonl`` says which file (path relative to SRC) and why.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from anonymization.audit import utc_now

QUARANTINE_LOG = "quarantine.jsonl"


class Quarantine:
    """Copies refused files under ``directory`` (same relative path as in SRC)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.log_path = self.directory / QUARANTINE_LOG

    def _ensure(self) -> None:
        if not self.directory.exists():
            self.directory.mkdir(parents=True, mode=0o700)

    def add(self, source: Path, relative: str, reason: str, input_digest: str = "") -> dict[str, str]:
        """Copy ``source`` into the quarantine (atomically) and log why."""
        self._ensure()
        target = self.directory / relative
        if target.resolve() == self.log_path.resolve():
            target = self.directory / "files" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        except OSError:
            tmp.unlink(missing_ok=True)
            reason = f"{reason}; the file could not be copied into quarantine"
        record = {"source": relative, "reason": reason, "time": utc_now()}
        if input_digest:
            record["input_digest"] = input_digest
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        return record

    def records(self) -> list[dict[str, str]]:
        """Everything logged so far, oldest first."""
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text("utf-8").splitlines() if line.strip()]
