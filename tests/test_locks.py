"""One writer per output folder: the lock file, its takeover when stale, and the commands that take it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from dreamguide.locks import LOCK_FILE, OutputLocked, lock_file_name, output_lock


def _write_lock(folder, pid, host=None, command="sample"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                "command": command, "time": 0}), encoding="utf-8")


@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def test_the_lock_is_held_inside_the_block_and_removed_after(tmp_path):
    with output_lock(tmp_path / "out", "sample") as path:
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["command"] == "sample"
        with pytest.raises(OutputLocked, match=r"is being written by dreamguide sample \(pid \d+"):
            with output_lock(tmp_path / "out", "train"):
                pass
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_a_live_owner_stops_the_second_process_and_its_lock_stays(tmp_path, live_process):
    _write_lock(tmp_path, live_process, command="train")
    with pytest.raises(OutputLocked, match=rf"dreamguide train \(pid {live_process} on .*delete .*\.dreamguide\.lock"):
        with output_lock(tmp_path, "train"):
            pass
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == live_process


def test_a_lock_of_another_host_is_honoured(tmp_path):
    _write_lock(tmp_path, 1, host="elsewhere.example")
    with pytest.raises(OutputLocked, match="on elsewhere.example"):
        with output_lock(tmp_path, "sample"):
            pass


def test_a_stale_or_torn_lock_is_taken_over_with_a_warning(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_lock(tmp_path, int(finished.stdout))  # that process has exited
    with pytest.warns(UserWarning, match="which no longer runs"):
        with output_lock(tmp_path, "sample"):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    (tmp_path / LOCK_FILE).write_text('{"pid": 12', encoding="utf-8")  # killed mid-write
    with pytest.warns(UserWarning):
        with output_lock(tmp_path, "sample"):
            pass


def test_ranks_of_one_launch_take_their_own_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert lock_file_name() == ".dreamguide-rank1.lock"
    with output_lock(tmp_path, "bench"):
        monkeypatch.setenv("RANK", "0")
        with output_lock(tmp_path, "bench"):  # rank 0 of the same launch: its own file
            assert sorted(p.name for p in tmp_path.iterdir()) == [".dreamguide-rank1.lock", LOCK_FILE]


def test_train_command_stops_on_a_locked_output_folder(tmp_path, live_process, capsys):
    from dreamguide.cli import main

    out = tmp_path / "run"
    _write_lock(out, live_process, command="train")
    config = tmp_path / "run.toml"
    photos = tmp_path / "photos"
    photos.mkdir()
    config.write_text(f'[model]\npretrained = "unused"\n[data]\ninstance_dir = "{photos}"\nclass_word = "dog"\n'
                      f'[output]\ndir = "{out}"\n', encoding="utf-8")
    assert main(["train", "--config", str(config)]) == 2
    assert f"is being written by dreamguide train (pid {live_process}" in capsys.readouterr().err


def test_a_folder_made_for_the_lock_goes_again_when_nothing_was_written(tmp_path):
    with pytest.raises(RuntimeError):
        with output_lock(tmp_path / "new", "sample"):
            raise RuntimeError("failed before writing")
    assert not (tmp_path / "new").exists()
    with output_lock(tmp_path / "kept", "sample"):
        (tmp_path / "kept" / "image.png").write_bytes(b"x")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["image.png"]


def test_taking_the_lock_clears_temporary_files_of_killed_writes(tmp_path):
    (tmp_path / ".grid.png.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".checkpoint-4.xyz.tmp").mkdir()
    (tmp_path / "keep.png").write_bytes(b"x")
    with pytest.warns(UserWarning, match="removed 2 unfinished temporary file"):
        with output_lock(tmp_path, "train"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]


def test_an_output_path_that_is_a_file_is_named_for_every_command(tmp_path, capsys):
    from dreamguide.cli import main

    a_file = tmp_path / "out.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=r"out\.txt is a file; give a folder for train's outputs"):
        with output_lock(a_file, "train"):
            pass
    with pytest.raises(ValueError, match=r"is below .*out\.txt, which is a file"):
        with output_lock(a_file / "run", "bench dreambench"):
            pass
    assert main(["toyworld", "personalize", "--out", str(a_file), "--steps", "1", "--device", "cpu"]) == 2
    assert "is a file; give a folder for toyworld personalize's outputs" in capsys.readouterr().err
