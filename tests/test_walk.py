"""The folder walker: links, loops, special files, huge files and odd names, by hand and over
random trees (hypothesis)."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lggunet import dataset, kaggle3m, walk
from lggunet.configs import unet
from lggunet.errors import DataError
from tests.conftest import write_case


def tif(rel: PurePosixPath) -> bool:
    return rel.name.lower().endswith((".tif", ".tiff"))


def names(found):
    return [f.rel.as_posix() for f in found]


def test_links_inside_are_followed_and_the_rest_named(tmp_path):
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x_1.tif").write_bytes(b"1")
    (tmp_path / "outside.tif").write_bytes(b"2")
    (root / "b").symlink_to(root / "a")  # a folder link inside: followed
    (root / "c.tif").symlink_to(root / "a" / "x_1.tif")  # a file link inside: followed
    (root / "a" / "loop").symlink_to(root)  # back to the root: named, not followed
    (root / "out.tif").symlink_to(tmp_path / "outside.tif")  # leaves the root: named
    (root / "gone.tif").symlink_to(root / "nothing.tif")  # dangling: named
    os.mkfifo(root / "pipe.tif")  # would block a reader: named, never opened
    (root / "notes.txt").symlink_to(tmp_path / "outside.tif")  # not wanted: left alone
    (root / "self.tif").symlink_to(root / "self.tif")  # a link to itself: named
    (root / "TCGA_gone").symlink_to(tmp_path / "nowhere")  # a folder link to nothing: named
    (root / "c\nerror: fake.tif").write_bytes(b"3")  # a newline in a name: one line still
    os.mkfifo(root / "c\nerror: pipe.tif")
    found, problems = walk.list_files(root, tif)
    assert names(found) == ["a/x_1.tif", "c\nerror: fake.tif", "c.tif"]  # b/ = a/: once
    text = "\n".join(problems)
    assert f"{root / 'b'}: a symlink loop" in text or f"{root / 'a'}: a symlink loop" in text
    assert f"{root / 'a' / 'loop'}: a symlink loop" in text
    assert f"{root / 'out.tif'}: a symlink out of {root}" in text
    assert f"{root / 'gone.tif'}: a symlink to {root / 'nothing.tif'}, which is missing" in text
    assert f"{root / 'pipe.tif'}: a FIFO (named pipe), not a file; never opened" in text
    assert "notes.txt" not in text
    assert f"{root / 'self.tif'}: a symlink loop (it leads to itself)" in text
    assert f"{root / 'TCGA_gone'}: a symlink to {tmp_path / 'nowhere'}, which is missing" in text
    assert f"{root}/c\\nerror: pipe.tif: a FIFO" in text
    assert all("\n" not in p for p in problems) and len(problems) == 8


def test_huge_sparse_file_is_named_before_reading(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    with (root / "big.tif").open("wb") as f:
        f.truncate(50 * 2**30)  # 50 GiB, sparse: costs nothing on disk
    found, problems = walk.list_files(root, tif)
    assert found == [] and problems == [
        f"{root / 'big.tif'}: {50 * 2**30} bytes, far larger than a slice (limit "
        f"{walk.MAX_FILE_BYTES}); not read"
    ]
    with pytest.raises(DataError, match="far larger than a slice"):
        walk.read_file(root / "big.tif")


def test_read_file_never_blocks_on_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "p.tif")
    result = {}

    def read():
        try:
            walk.read_file(tmp_path / "p.tif")
        except DataError as e:
            result["error"] = str(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "read_file blocked on a FIFO"
    assert "a FIFO (named pipe), not a file" in result["error"]


def test_a_name_that_is_not_utf8_is_named_and_printable(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    bad = os.fsencode(root) + b"/TCGA_AA_0001_20000101_\xff.tif"
    with open(bad, "wb") as f:
        f.write(b"x")
    found, problems = walk.list_files(root, tif)
    assert found == []
    assert problems == [
        f"{root}/TCGA_AA_0001_20000101_\\xff.tif: the name is not valid UTF-8; rename it"
    ]
    problems[0].encode("utf-8")  # printable as it is


def _config(src: Path, data_dir: Path):
    config = unet.get_config()
    config.data.manual_dir = str(src)
    config.data.data_dir = str(data_dir)
    return config.data


def test_upper_case_extensions_train_as_lower_case_ones(tmp_path):
    lower, upper = tmp_path / "lower" / "kaggle_3m", tmp_path / "upper" / "kaggle_3m"
    for root in (lower, upper):
        for i in range(3):
            write_case(root, f"TCGA_AA_000{i}_20000101", 2, seed=i)
    for f in sorted(upper.rglob("*.tif")):
        f.rename(f.with_name(f.name.replace("_mask.tif", "_MASK.TIF").replace(".tif", ".TIF")))
    a = kaggle3m.list_slices(kaggle3m.open_source(lower))
    b = kaggle3m.list_slices(kaggle3m.open_source(upper))
    assert [(s.case, s.index) for s in a] == [(s.case, s.index) for s in b]
    assert b[0].image.endswith(".TIF") and b[0].mask.endswith("_MASK.TIF")


def test_data_set_names_links_fifos_and_absurd_slice_numbers(tmp_path):
    src = tmp_path / "src" / "kaggle_3m"
    write_case(src, "TCGA_AA_0001_20000101", 2)
    write_case(tmp_path / "elsewhere", "TCGA_AA_0002_20000102", 2, seed=1)
    (src / "TCGA_AA_0002_20000102").symlink_to(tmp_path / "elsewhere" / "TCGA_AA_0002_20000102")
    with pytest.raises(DataError, match="a symlink out of"):
        kaggle3m.list_slices(kaggle3m.open_source(src))
    (src / "TCGA_AA_0002_20000102").unlink()
    os.mkfifo(src / "TCGA_AA_0001_20000101" / "TCGA_AA_0001_20000101_9.tif")
    with pytest.raises(DataError, match="a FIFO"):
        kaggle3m.list_slices(kaggle3m.open_source(src))
    (src / "TCGA_AA_0001_20000101" / "TCGA_AA_0001_20000101_9.tif").unlink()
    folder = src / "TCGA_AA_0001_20000101"
    shutil.copy(
        folder / "TCGA_AA_0001_20000101_1.tif", folder / "TCGA_AA_0001_20000101_99999999999.tif"
    )
    with pytest.raises(DataError, match="slice number 99999999999 is not plausible"):
        kaggle3m.list_slices(kaggle3m.open_source(src))


def test_edited_slice_with_the_same_size_and_time_is_prepared_afresh(tmp_path):
    src = tmp_path / "src" / "kaggle_3m"
    for i in range(3):
        write_case(src, f"TCGA_AA_000{i}_20000101", 2, seed=i)
    first = dataset.prepare(_config(src, tmp_path / "tfds"))
    image = src / "TCGA_AA_0000_20000101" / "TCGA_AA_0000_20000101_1.tif"
    stat = image.stat()
    data = bytearray(image.read_bytes())
    data[-1] ^= 0xFF  # one pixel, same size
    image.write_bytes(bytes(data))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the time stamp kept
    assert image.stat().st_size == stat.st_size and image.stat().st_mtime_ns == stat.st_mtime_ns
    second = dataset.prepare(_config(src, tmp_path / "tfds"))
    assert second.data_path != first.data_path  # a new fingerprint: prepared again


def test_damaged_prepared_copy_is_a_clear_error(tmp_path):
    src = tmp_path / "src" / "kaggle_3m"
    for i in range(3):
        write_case(src, f"TCGA_AA_000{i}_20000101", 2, seed=i)
    builder = dataset.prepare(_config(src, tmp_path / "tfds"))
    folder = Path(str(builder.data_path))
    assert (folder / dataset.CHECKSUMS_FILE).exists()
    shard = sorted(folder.glob("*train.array_record*"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        dataset.prepare(_config(src, tmp_path / "tfds"))
    assert str(e.value).startswith(f"{shard}: the prepared copy is damaged")
    assert f"delete {folder} and rerun" in str(e.value)
    shutil.rmtree(folder)  # the fix the message gives
    dataset.prepare(_config(src, tmp_path / "tfds"))


# --- random trees ---------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c.tif", "d.TIF", "e.tiff", "f.txt"])
ENTRY = st.tuples(
    st.sampled_from(["dir", "file", "big", "fifo", "link_in", "link_out", "dangling"]),
    st.lists(NAMES, min_size=1, max_size=3),  # where, as a path of names
    st.integers(0, 10),  # which existing entry a link points to
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(entries=st.lists(ENTRY, max_size=14))
def test_random_trees_of_files_links_and_special_files(entries):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, outside = tmp / "root", tmp / "outside.tif"
        root.mkdir()
        outside.write_bytes(b"o")
        (root / "z.tif").write_bytes(b"z")  # so that a link back to the root repeats a file
        made: list[Path] = [root]
        for kind, parts, pick in entries:
            path = root.joinpath(*parts)
            if not path.parent.is_dir() or os.path.lexists(path):
                continue
            if kind == "dir":
                path.mkdir()
            elif kind == "file":
                path.write_bytes(b"x")
            elif kind == "big":
                with path.open("wb") as f:
                    f.truncate(walk.MAX_FILE_BYTES + 1)
            elif kind == "fifo":
                os.mkfifo(path)
            elif kind == "link_in":
                path.symlink_to(made[pick % len(made)])
            elif kind == "link_out":
                path.symlink_to(outside)
            else:
                path.symlink_to(root / "missing")
            made.append(path)

        result: dict = {}
        worker = threading.Thread(
            target=lambda: result.update(out=walk.list_files(root, tif)), daemon=True
        )
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), "the walker hung"
        found, problems = result["out"]

        real_root = root.resolve()
        rels = names(found)
        assert len(rels) == len(set(rels))  # nothing listed twice under one name
        for f in found:  # only regular, small, wanted files inside the root
            real = f.path.resolve()
            assert real_root in real.parents and real.is_file() and tif(f.rel)
            assert real.stat().st_size <= walk.MAX_FILE_BYTES
            assert walk.read_file(f.path) == real.read_bytes()
        # Each folder is listed once: no more entries than files plus links to files.
        file_links = [p for p in made if p.is_symlink() and tif(PurePosixPath(p.name))]
        assert len(found) <= len({f.path.resolve() for f in found}) + len(file_links)
        # Every small wanted regular file of the real tree is found (under some name).
        reached = {f.path.resolve() for f in found}
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                p = Path(dirpath) / name
                small = p.is_file() and p.stat().st_size <= walk.MAX_FILE_BYTES
                if tif(PurePosixPath(name)) and not p.is_symlink() and small:
                    assert p.resolve() in reached, p
        # Every wanted entry it will not read is named in a problem of its own (under the
        # name it was reached by: a folder listed through a link keeps the link's name).
        said = {}
        for line in problems:
            assert "\n" not in line
            where, message = line.split(": ", 1)
            said[(os.path.realpath(Path(where).parent), Path(where).name)] = message
        for path in made[1:]:
            if not tif(PurePosixPath(path.name)) or path.is_dir():
                continue
            if any(q.is_symlink() for q in path.parents if root in q.parents):
                continue  # made through a link: the same entry as its real path
            message = said.get((os.path.realpath(path.parent), path.name), "")
            if path.is_symlink() and not path.exists():
                assert message.startswith("a symlink to"), (path, message)
            elif path.is_symlink() and real_root not in path.resolve().parents:
                assert message.startswith("a symlink out of"), (path, message)
            elif not path.resolve().is_file():
                assert message.startswith("a FIFO"), (path, message)
            elif path.stat().st_size > walk.MAX_FILE_BYTES:
                assert "far larger than a slice" in message, (path, message)
            else:
                assert message == "", (path, message)
