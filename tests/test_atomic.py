"""hcdiag.atomic.write_bytes: a file written whole or not at all (the checks documents verify caches)."""

import errno
import os

import pytest

from hcdiag import atomic


def test_write_bytes_replaces_the_file_whole(tmp_path):
    p = tmp_path / "run.checks.json"
    atomic.write_bytes(p, b'{"a": 1}')
    atomic.write_bytes(p, b'{"a": 2}')
    assert p.read_bytes() == b'{"a": 2}' and sorted(x.name for x in tmp_path.iterdir()) == ["run.checks.json"]


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, where):
    p = tmp_path / "run.checks.json"
    p.write_bytes(b"old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, where, full)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_bytes(p, b"new" * 1000)
    monkeypatch.undo()
    assert p.read_bytes() == b"old" and sorted(x.name for x in tmp_path.iterdir()) == ["run.checks.json"]


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    p = tmp_path / "run.checks.json"
    stale = tmp_path / ".run.checks.json.abcd1234.tmp"  # what a writer killed mid-write leaves (unlocked)
    stale.write_bytes(b"{half")
    atomic.write_bytes(p, b"{}")
    assert not stale.exists() and p.read_bytes() == b"{}"
