"""Files that several writers share (a cross-validation's config.json and report when its folds
train side by side with data.cv_fold=k) stay whole: each writer renames its own temporary file."""

import concurrent.futures
import json

import ml_collections

from lggunet import configuration, files


def _hammer(write, rounds: int = 200, writers: int = 8) -> None:
    with concurrent.futures.ThreadPoolExecutor(writers) as pool:
        for f in [
            pool.submit(lambda w=w: [write(w, i) for i in range(rounds)]) for w in range(writers)
        ]:
            f.result()  # re-raises a writer's error (a shared temporary name: FileNotFoundError)


def test_save_config_side_by_side(tmp_path):
    def write(writer, i):
        configuration.save_config(ml_collections.ConfigDict({"writer": writer, "i": i}), tmp_path)

    _hammer(write)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved) == {"writer", "i"} and saved["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left


def test_write_atomic_side_by_side(tmp_path):
    target = tmp_path / "cv_report.json"

    def write(writer, i):
        files.write_atomic(target, json.dumps({"writer": writer, "pad": "x" * 5000}) + "\n")

    _hammer(write)
    assert len(json.loads(target.read_text())["pad"]) == 5000
    assert [p.name for p in tmp_path.iterdir()] == ["cv_report.json"]


def test_write_atomic_keeps_the_old_file_and_no_temporary_when_the_write_fails(tmp_path):
    target = tmp_path / "curves.png"
    target.write_bytes(b"old")

    def fail(p):
        p.write_bytes(b"half")
        raise OSError("disk full")

    try:
        files.write_atomic(target, fail)
    except OSError:
        pass
    else:
        raise AssertionError("the error was swallowed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    files.write_atomic(target, lambda p: p.write_bytes(p.suffix.encode()))
    assert target.read_bytes() == b".png"  # the temporary file keeps the suffix
