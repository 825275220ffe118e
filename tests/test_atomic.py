"""lmlab.atomic: crash-safe writes, directory publishing and the inter-process lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from lmlab.atomic import (
    FileLock,
    LockHeld,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    publish_dir,
    staged_dir,
)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_writes_replace_the_file_and_leave_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert target.read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
    atomic_write_text(target, "new text")
    assert target.read_text() == "new text"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert leftovers(target.parent) == []
    with pytest.raises(ValueError):
        atomic_write_json(target, {"x": float("nan")}, allow_nan=False)
    assert target.read_bytes() == b"\x00\x01" and leftovers(target.parent) == []


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_staged_dir_publishes_replaces_and_cleans_up(tmp_path):
    final = tmp_path / "cache"
    with staged_dir(final) as tmp:
        (tmp / "meta.json").write_text(json.dumps({"v": 1}))
        assert not final.exists()
    assert json.loads((final / "meta.json").read_text()) == {"v": 1}
    with staged_dir(final) as tmp:
        (tmp / "meta.json").write_text(json.dumps({"v": 2}))
    assert json.loads((final / "meta.json").read_text()) == {"v": 2}
    with pytest.raises(KeyError):
        with staged_dir(final) as tmp:
            (tmp / "meta.json").write_text("partial")
            raise KeyError("crash")
    assert json.loads((final / "meta.json").read_text()) == {"v": 2}
    # replace=False: a copy another process finished first is kept
    with staged_dir(final, replace=False) as tmp:
        (tmp / "meta.json").write_text(json.dumps({"v": 3}))
    assert json.loads((final / "meta.json").read_text()) == {"v": 2}
    assert leftovers(tmp_path) == []
    other = tmp_path / "other"
    other.mkdir()
    assert publish_dir(other, tmp_path / "published") and (tmp_path / "published").is_dir() and not other.exists()


def test_lock_is_exclusive_names_the_holder_and_leaves_no_file(tmp_path):
    path = tmp_path / "run.lock"
    first = FileLock(path).acquire(timeout=0)
    assert path.read_text().strip() == str(os.getpid())
    with pytest.raises(LockHeld) as info:
        FileLock(path).acquire(timeout=0)
    assert info.value.pid == os.getpid() and str(os.getpid()) in str(info.value)
    first.release()
    assert not path.exists()
    with FileLock(path):
        assert path.exists()
    assert not path.exists()


def test_a_waiting_lock_gets_it_when_the_holder_releases(tmp_path):
    path = tmp_path / "results.lock"
    holder = FileLock(path).acquire()
    threading.Timer(0.3, holder.release).start()
    start = time.monotonic()
    waiter = FileLock(path).acquire(timeout=10)
    assert time.monotonic() - start >= 0.25
    waiter.release()
    assert not path.exists()


def test_lock_of_a_live_process_is_refused_and_of_a_dead_one_taken_over(tmp_path):
    path = tmp_path / "out.lock"
    code = ("import sys, time; from lmlab.atomic import FileLock; FileLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as info:
            FileLock(path).acquire(timeout=0)
        assert info.value.pid == proc.pid
    finally:
        proc.kill()
        proc.wait()
    # the killed holder never released: its file (and PID) stay behind, and the kernel dropped its flock
    assert path.read_text().strip() == str(proc.pid)
    with FileLock(path):
        assert path.read_text().strip() == str(os.getpid())
    assert not path.exists()


def test_a_lock_file_naming_a_live_process_is_honoured_without_its_flock(tmp_path):
    path = tmp_path / ".lock"
    path.write_text(str(os.getppid()))
    with pytest.raises(LockHeld) as info:
        FileLock(path).acquire(timeout=0)
    assert info.value.pid == os.getppid()
    assert path.read_text() == str(os.getppid())  # someone else's lock is left alone


def test_a_tokenizer_published_first_is_kept_by_a_second_trainer(tmp_path):
    # two ranks on separate nodes may both train the mixture's tokenizer into one shared folder: the second
    # must not swap the folder under the first (it could be loading it) but take the one already there
    from lmlab.data.tokenizer import train_bpe

    texts = ["the quick brown fox jumps over the lazy dog " * 20, "pack my box with five dozen liquor jugs " * 20]
    out = tmp_path / "tok"
    first = train_bpe(texts, 300, out)
    inode = out.stat().st_ino
    second = train_bpe(texts, 320, out, replace=False)
    assert out.stat().st_ino == inode and len(second) == len(first)
    assert not [p for p in tmp_path.iterdir() if p.name != "tok"]  # the discarded copy is gone
    third = train_bpe(texts, 320, out)  # the default still replaces (lmlab tokenizer train --out)
    assert out.stat().st_ino != inode and len(third) != len(first)
