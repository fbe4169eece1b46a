"""The quarantine folder: raw files the engine would not de-identify, with reasons.

It holds original (identifying) files, so it lives outside DST, is created
0700, its copies are 0600, and it only ever receives copies of regular files
(a symbolic link or a device in SRC is logged, never followed or read): nothing in SRC is moved or modified.
``quarantine.jsonl`` says which file (path relative to SRC) and why.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from anonymization.audit import utc_now
from anonymization.errors import is_disk_full
from anonymization.worker import NotRegularFile, open_regular
from medfed.files import open_atomic

QUARANTINE_LOG = "quarantine.jsonl"


class Quarantine:
    """Copies refused files under ``directory`` (same relative path as in SRC)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.log_path = self.directory / QUARANTINE_LOG

    def _ensure(self) -> None:
        if not self.directory.exists():
            self.directory.mkdir(parents=True, mode=0o700)

    def add(
        self, source: Path, relative: str, reason: str, input_digest: str = "", *, copy: bool = True
    ) -> dict[str, str]:
        """Copy ``source`` into the quarantine (atomically, mode 0600) and log why.

        ``copy=False`` (a symbolic link, a device) only logs it. The copy never
        follows a link either: a file swapped for one since it was read is logged,
        not copied. A full disk is not the file's fault: it raises (the run stops).
        """
        self._ensure()
        if copy:
            try:
                self._copy(source, relative)
            except NotRegularFile as err:
                reason = f"{reason}; not copied: {err.reason}"
            except OSError as err:
                if is_disk_full(err):
                    raise
                reason = f"{reason}; the file could not be copied into quarantine"
        record = {"source": relative, "reason": reason, "time": utc_now()}
        if input_digest:
            record["input_digest"] = input_digest
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        return record

    def _copy(self, source: Path, relative: str) -> None:
        target = self.directory / relative
        if target.resolve() == self.log_path.resolve():
            target = self.directory / "files" / relative
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # 0600 whatever the umask: these are identifying files
        with os.fdopen(open_regular(source), "rb") as src, open_atomic(target, 0o600) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    def records(self) -> list[dict[str, str]]:
        """Everything logged so far, oldest first."""
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text("utf-8").splitlines() if line.strip()]
