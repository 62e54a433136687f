"""All-or-nothing writes: the old file survives a failed write, and a full disk is named as such."""

import errno

import pytest

from cov3d import atomic
from cov3d.atomic import leftover_temporaries, replaced_atomically, write_failure_reason, write_text_atomically
from cov3d.errors import Cov3dError

REMEDY = "Free some space."


def full_disk(monkeypatch):
    """Make the disk look full to write_failure_reason, as it does after a write has filled it."""
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda folder: type("Usage", (), {"free": 4096})())


def test_success_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    write_text_atomically(path, "new", REMEDY)
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_concurrent_writers_of_one_path_do_not_share_a_temporary_file(tmp_path):
    path = tmp_path / "model.safetensors"
    with replaced_atomically(path, REMEDY) as first:
        with replaced_atomically(path, REMEDY) as second:
            assert first != second and first.name.startswith(".model.safetensors.") and first.suffix == ".tmp"
            first.write_text("first")
            second.write_text("second")
        assert path.read_text() == "second" and first.read_text() == "first"
    assert path.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_leftover_temporaries_are_the_paths_own_only(tmp_path):
    """What a writer of a path killed mid-write leaves is found; other files, also of similar names (a user's
    copy with characters tempfile never draws), are not."""
    path = tmp_path / "metrics[1].csv"  # glob's special characters in the name
    with replaced_atomically(path, REMEDY) as temp:
        assert leftover_temporaries(path) == [temp]
    assert leftover_temporaries(path) == []
    killed = tmp_path / ".metrics[1].csv.a1b2_c3d.tmp"
    for name in (killed.name, ".metrics[1].csv.tmp", ".metrics[1].csv.toolong12.tmp", "metrics[1].csv.a1b2_c3d.tmp",
                 ".metrics.csv.a1b2_c3d.tmp", "metrics[1].csv", ".metrics[1].csv.old-copy.tmp", ".metrics[1].csv.Backup12.tmp"):
        (tmp_path / name).write_text("")
    (tmp_path / ".metrics[1].csv.folder00.tmp").mkdir()
    assert leftover_temporaries(path) == [killed]


def test_a_name_at_the_limit_has_its_temporaries_found(tmp_path):
    path = tmp_path / ("n" * 255)
    with replaced_atomically(path, REMEDY) as temp:
        assert len(temp.name) <= 255 and leftover_temporaries(path) == [temp]


def test_a_folder_that_cannot_be_written_is_named_without_the_space_advice(tmp_path):
    path = tmp_path / "run" / "config.json"
    with pytest.raises(Cov3dError, match=r"config\.json: No such file or directory\. Check that .*run exists"):
        write_text_atomically(path, "{}", REMEDY)
    with pytest.raises(Cov3dError) as error:
        with replaced_atomically(tmp_path / "x.png", REMEDY):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert str(error.value) == f"Cannot write {tmp_path / 'x.png'}: Permission denied. Check that {tmp_path} can be written."


def test_os_error_keeps_the_old_file_and_says_why(tmp_path):
    path = tmp_path / "best-presence.safetensors"
    path.write_bytes(b"previous best")
    with pytest.raises(Cov3dError) as error:
        with replaced_atomically(path, REMEDY) as temp:
            temp.write_bytes(b"half a fi")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(error.value) == f"Cannot write {path}: No space left on device. {REMEDY}"
    assert path.read_bytes() == b"previous best"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_library_error_on_a_full_disk_is_named_as_a_full_disk(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError('[enforce fail at inline_container.cc] unexpected pos ...')."""
    full_disk(monkeypatch)
    path = tmp_path / "checkpoint.pth"
    with pytest.raises(Cov3dError, match=r"checkpoint.pth: No space left on device\. Free some space\.$"):
        with replaced_atomically(path, REMEDY) as temp:
            temp.write_bytes(b"torn")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through_and_clean_up(tmp_path):
    path = tmp_path / "summary.json"
    with pytest.raises(RuntimeError, match="a bug"):
        with replaced_atomically(path, REMEDY) as temp:
            temp.write_text("{")
            raise RuntimeError("a bug")
    assert list(tmp_path.iterdir()) == []


def test_write_failure_reason(tmp_path, monkeypatch):
    assert write_failure_reason(PermissionError(errno.EACCES, "Permission denied"), tmp_path) == "Permission denied"
    assert write_failure_reason(RuntimeError("x"), tmp_path) is None  # this disk has room
    full_disk(monkeypatch)
    assert write_failure_reason(RuntimeError("x"), tmp_path) == "No space left on device"
