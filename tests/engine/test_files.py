import os

import pytest

from qforge.engine.files import staged_dir, write_json, write_text


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_text(target, "old")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        from qforge.engine.files import atomic_write

        def write(temp):
            temp.write_text("half")
            raise Boom
        atomic_write(target, write)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]


def test_written_files_and_directories_get_the_umask_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        path = write_json(tmp_path / "a.json", {"x": 1})
        with staged_dir(tmp_path / "final") as work:
            (work / "f").write_text("x")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o755


def test_staged_dir_replaces_only_after_success(tmp_path):
    target = tmp_path / "final"
    with staged_dir(target) as work:
        (work / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with staged_dir(target) as work:
            (work / "v").write_text("2")
            raise RuntimeError
    assert (target / "v").read_text() == "1"
    with staged_dir(target) as work:
        (work / "v").write_text("3")
    assert (target / "v").read_text() == "3"
    assert sorted(os.listdir(tmp_path)) == ["final"]
