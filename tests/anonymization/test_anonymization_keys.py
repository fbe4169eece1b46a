"""The site secret's key file: created 0600, validated, refused when too open."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from anonymization.errors import DeidError, KeyFileError
from anonymization.keys import load_or_create_secret


def test_created_with_mode_0600_and_stable(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "site.key"
    secret = load_or_create_secret(key)
    assert len(secret) == 32
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    text = key.read_text()
    assert text == secret.hex() + "\n"
    assert load_or_create_secret(key) == secret
    assert load_or_create_secret(tmp_path / "other.key") != secret


def test_refuses_key_readable_by_others(tmp_path: Path) -> None:
    key = tmp_path / "site.key"
    load_or_create_secret(key)
    os.chmod(key, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_secret(key)
    os.chmod(key, 0o640)
    with pytest.raises(DeidError, match="group/others"):
        load_or_create_secret(key)


@pytest.mark.parametrize("content", ["", "zz" * 32 + "\n", "ab" * 16 + "\n", "ab" * 32 + "\nab\n"])
def test_malformed_key_is_a_clear_error(tmp_path: Path, content: str) -> None:
    key = tmp_path / "site.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content.encode())
    os.close(fd)
    with pytest.raises(KeyFileError, match="malformed"):
        load_or_create_secret(key)


def test_directory_is_not_a_key_file(tmp_path: Path) -> None:
    folder = tmp_path / "keydir"
    folder.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_or_create_secret(folder)
