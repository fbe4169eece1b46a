"""medfed.files: the one atomic, durable write and the one private-file check every part uses."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from medfed.files import open_atomic, private_file_problem, write_file, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    write_text(path, "old")
    with pytest.raises(RuntimeError), open_atomic(path) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_modes_are_set_whatever_the_umask_or_left_to_it(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_file(tmp_path / "public.pem", b"x")  # 0644 even under UMask=0077 (the site unit's)
        write_file(tmp_path / "k" / "private.key", b"x", 0o600, dir_mode=0o700)
        write_file(tmp_path / "state.json", b"x", mode=None)  # as open() would: the umask decides
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "public.pem").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "k" / "private.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600


def test_the_file_and_its_folder_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_text(tmp_path / "a.json", "{}")
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)


def test_private_file_problem_names_the_file_and_the_fix(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    write_file(key, b"secret", 0o600)
    assert private_file_problem(key, "key file") is None
    os.chmod(key, 0o640)
    problem = private_file_problem(key, "key file")
    assert problem and "group/others (mode 0640)" in problem and f"chmod 600 {key}" in problem
    assert "not a regular file" in (private_file_problem(tmp_path, "key file") or "")
    with pytest.raises(FileNotFoundError):
        private_file_problem(tmp_path / "missing", "key file")
