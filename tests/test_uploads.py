"""uploads.py: stored image sets, validated, atomic, traversal-proof."""

import io
import os
import threading
import time
import zipfile

import pytest
from PIL import Image

from vptdash.engine import data, paths
from vptdash.runs import uploads


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VPTDASH_HOME", str(tmp_path))
    return tmp_path


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (12, 12), color=value).save(buffer, format="PNG")
    return buffer.getvalue()


def make_zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def two_class_files():
    return [(f"img{i}.png", png(40 * i), "ok") for i in range(3)] + [
        (f"img{i}.png", png(200 - 30 * i), "crack") for i in range(2)
    ]


def visible_entries():
    return sorted(p.name for p in paths.uploads_dir().iterdir() if not p.name.startswith("."))


def test_zip_round_trip_with_wrapper_folder():
    content = make_zip(
        {
            "mycells/good/a.png": png(10),
            "mycells/good/b.png": png(20),
            "mycells/bad/c.png": png(200),
            "mycells/bad/d.png": png(220),
            "mycells/bad/notes.txt": b"hello",
            "__MACOSX/._a.png": b"junk",
        }
    )
    info = uploads.save_zip_upload("My cells!", content)
    assert info.slug == "my-cells" and info.name == "My cells!"
    assert info.n_images == 4 and info.classes == {"bad": 2, "good": 2}
    assert any("notes.txt" in f for f, _ in info.skipped)
    assert sorted(p.name for p in info.path.iterdir() if not p.name.startswith(".")) == ["bad", "good"]
    listed = uploads.list_uploads()
    assert [u.slug for u in listed] == ["my-cells"] and listed[0].classes == info.classes
    spec = uploads.upload_spec("my-cells")
    image_set = data.load_image_set(spec, 32)
    assert image_set.class_counts() == {"bad": 2, "good": 2}
    assert not any("upload.json" in f for f, _ in image_set.skipped)  # metadata invisible to the loader


def test_files_upload_two_classes_sanitizes_and_dedupes_names():
    files = two_class_files() + [("../../evil/img0.png", png(90), "ok"), ("C:\\x\\IMG0.PNG", png(91), "ok")]
    info = uploads.save_files_upload("files", files)
    assert info.classes == {"crack": 2, "ok": 5}
    ok_files = sorted(p.name for p in (info.path / "ok").iterdir())
    assert len(ok_files) == 5 and all("/" not in f and ".." not in f for f in ok_files)
    assert not (paths.uploads_dir().parent / "evil").exists()


def test_one_class_upload_rejected_and_nothing_left():
    with pytest.raises(data.DatasetError, match="only one class"):
        uploads.save_files_upload("single", [(f"{i}.png", png(i * 50), "only") for i in range(3)])
    assert list(paths.uploads_dir().iterdir()) == []
    assert uploads.list_uploads() == []


def test_not_a_zip_and_traversal_zip_rejected():
    with pytest.raises(data.DatasetError, match="is not a zip file"):
        uploads.save_zip_upload("bad", b"definitely not a zip")
    evil = make_zip(
        {"a/x.png": png(1), "a/y.png": png(2), "b/z.png": png(3), "b/w.png": png(4), "../escape.png": png(5)}
    )
    with pytest.raises(data.DatasetError, match="outside"):
        uploads.save_zip_upload("evil", evil)
    assert list(paths.uploads_dir().iterdir()) == []
    assert not (paths.uploads_dir().parent / "escape.png").exists()


def test_delete_and_refusals():
    info = uploads.save_files_upload("to delete", two_class_files())
    for bad in ("../x", "..", "a/b", "", ".staging-x"):
        with pytest.raises(ValueError):
            uploads.delete_upload(bad)
    with pytest.raises(FileNotFoundError):
        uploads.delete_upload("nope")
    uploads.delete_upload(info.slug)
    assert uploads.list_uploads() == [] and list(paths.uploads_dir().iterdir()) == []


def test_concurrent_saves_with_same_name_get_different_slugs():
    results, errors = [], []
    barrier = threading.Barrier(3)

    def save():
        try:
            barrier.wait()
            results.append(uploads.save_files_upload("same", two_class_files()))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=save) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(r.slug for r in results) == ["same", "same-2", "same-3"]
    assert visible_entries() == ["same", "same-2", "same-3"]
    assert all(u.n_images == 5 for u in uploads.list_uploads())


def test_list_ignores_broken_folders():
    uploads.save_files_upload("good", two_class_files())
    (paths.uploads_dir() / "broken").mkdir()
    (paths.uploads_dir() / "garbled").mkdir()
    (paths.uploads_dir() / "garbled" / uploads.META_FILE).write_text("{not json")
    assert [u.slug for u in uploads.list_uploads()] == ["good"]


def test_stale_staging_folders_are_removed_by_the_next_upload_and_fresh_ones_kept():
    """A staging folder older than STAGING_MAX_AGE_S is a crashed process's leftover; a younger one may
    belong to an upload still in progress in another tab."""
    root = paths.uploads_dir()
    now = time.time()

    def folder(name: str, age_s: float):
        path = root / name
        path.mkdir()
        (path / "part.png").write_bytes(png(10))
        os.utime(path, (now - age_s, now - age_s))
        return path

    stale = folder(f"{uploads.STAGING_PREFIX}crashed", uploads.STAGING_MAX_AGE_S + 60)
    fresh = folder(f"{uploads.STAGING_PREFIX}in-progress", uploads.STAGING_MAX_AGE_S - 60)
    old_dataset = folder("old-dataset", uploads.STAGING_MAX_AGE_S * 10)  # not staging: never touched
    info = uploads.save_zip_upload(
        "cells", make_zip({"a/1.png": png(10), "a/2.png": png(20), "b/1.png": png(200), "b/2.png": png(220)})
    )
    assert not stale.exists()
    assert fresh.exists() and (fresh / "part.png").exists()
    assert old_dataset.exists()
    assert info.slug in visible_entries()
