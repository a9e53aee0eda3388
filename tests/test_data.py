import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vptdash.engine import data
from vptdash.engine.data import (
    DatasetError,
    ImageSet,
    Limits,
    clear_memory_cache,
    extract_zip_safely,
    load_image_set,
    normalize,
    split_image_set,
)

R = 16  # small resolution keeps the tests fast


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VPTDASH_HOME", str(tmp_path / "home"))
    clear_memory_cache()
    yield
    clear_memory_cache()


def save(path: Path, mode: str = "L", size=(20, 20), value=128, fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path, format=fmt)
    return path


def make_folder(root: Path, counts: dict[str, int], ext: str = "png") -> Path:
    for name, n in counts.items():
        for i in range(n):
            save(root / name / f"{i}.{ext}", value=(i * 40) % 256)
    return root


def all_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# ----------------------------------------------------------------------------- decoding


def test_modes_load_as_three_channel_uint8(tmp_path):
    root = tmp_path / "ds"
    save(root / "a" / "grey.png", "L", (30, 20), 77)
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    rgba.paste((0, 255, 0, 0), (0, 0, 10, 20))  # left half fully transparent
    rgba.save(root / "a" / "rgba.png")
    gradient = np.tile(np.linspace(1000, 4000, 20, dtype=np.uint16), (20, 1))  # 12-bit range in 16 bits
    Image.fromarray(gradient).save(root / "a" / "deep.png")
    assert Image.open(root / "a" / "deep.png").mode.startswith("I")
    save(root / "b" / "pal.gif", "P", value=3)
    save(root / "b" / "rgb.JPG", "RGB", (40, 40), (10, 200, 30), fmt="JPEG")
    save(root / "b" / "bw.bmp", "1", value=1)
    save(root / "b" / "cmyk.tiff", "CMYK", value=(0, 0, 0, 0))

    ds = load_image_set(root, R)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (7, 3, R, R)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert ds.class_names == ["a", "b"] and ds.resolution == R
    assert ds.class_counts() == {"a": 3, "b": 4}
    img = {f.split("/")[-1]: ds.images[i] for i, f in enumerate(ds.files)}
    assert (img["grey.png"] == 77).all()  # grey replicated to all three channels
    assert img["rgba.png"][:, :, :4].max() == 0  # transparent part composited on black
    assert img["rgba.png"][0, :, -4:].min() == 255 and img["rgba.png"][1:, :, -4:].max() == 0
    deep = img["deep.png"][0]
    assert deep.min() < 10 and deep.max() > 245  # 16-bit stretched to the full 8-bit range
    assert (deep[:, 1:].int() - deep[:, :-1].int() >= 0).all()  # gradient kept
    assert (img["bw.bmp"] == 255).all()
    rgb = img["rgb.JPG"].float().mean(dim=(1, 2))
    assert abs(rgb[0] - 10) < 6 and abs(rgb[1] - 200) < 6 and abs(rgb[2] - 30) < 6


def test_skipped_files_and_silent_junk(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 2, "dog": 2})
    save(root / "loose.png")
    (root / "cat" / "notes.txt").write_text("hi")
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    (root / "empty_class").mkdir()
    (root / ".hidden").mkdir()
    save(root / ".hidden" / "x.png")
    save(root / "__MACOSX" / "cat" / "._0.png")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0")

    ds = load_image_set(root, R)
    reasons = dict(ds.skipped)
    assert reasons["loose.png"] == "not inside a class folder"
    assert "not an image file" in reasons["cat/notes.txt"]
    assert "cannot identify image file" in reasons["dog/broken.png"]
    assert "empty class folder" in reasons["empty_class/"]
    assert len(ds.skipped) == 4  # hidden files, __MACOSX, .DS_Store: no note
    assert ds.class_names == ["cat", "dog"] and len(ds.files) == 4


def test_decompression_bomb_guard_skips_big_images(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 2})
    save(root / "a" / "huge.png", size=(200, 200))
    ds = load_image_set(root, R, limits=Limits(max_image_pixels=10_000))
    assert "a/huge.png" not in ds.files
    reason = dict(ds.skipped)["a/huge.png"]
    assert "40,000 pixels" in reason and "decompression bomb" in reason


# ----------------------------------------------------------------------------- bad input


def _collide(root):
    make_folder(root, {"Cat": 2, "dog": 2})
    make_folder(root, {"cat ": 2})


def _all_broken(root):
    for name in ("a", "b"):
        for i in range(2):
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / f"bad{i}.png").write_bytes(b"garbage")


def _empty_leaves_one(root):
    make_folder(root, {"only": 3})
    (root / "vacant").mkdir()


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda r: r.mkdir(), ["no image files found"]),
        (lambda r: make_folder(r, {"cat": 3}), ["found only one class 'cat'", "need at least 2"]),
        (lambda r: make_folder(r, {"cat": 3, "dog": 1}), ["class 'dog' has only 1"]),
        (_collide, ["'Cat'", "'cat '", "collide"]),
        (_all_broken, ["none of the 4 image files", "bad0.png", "cannot identify image file"]),
        (_empty_leaves_one, ["found only one class 'only'"]),
    ],
    ids=["empty", "one-class", "too-few", "collision", "all-broken", "empty-class-leaves-one"],
)
def test_bad_folders_raise_with_names(tmp_path, build, expected):
    root = tmp_path / "ds"
    build(root)
    with pytest.raises(DatasetError) as info:
        load_image_set(root, R)
    for part in expected:
        assert part in str(info.value)


def test_missing_spec_and_wrong_args(tmp_path):
    with pytest.raises(DatasetError, match="nowhere"):
        load_image_set(tmp_path / "nowhere", R)
    with pytest.raises(DatasetError, match="not-a-builtin"):
        load_image_set("not-a-builtin", R)
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 2})
    with pytest.raises(DatasetError, match="cell_type"):
        load_image_set(root, R, cell_type="mono")
    with pytest.raises(DatasetError, match="resolution"):
        load_image_set(root, 0)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="file.txt"):
        load_image_set(tmp_path / "file.txt", R)


def test_folder_limits(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 3, "b": 3})
    with pytest.raises(DatasetError, match="max_files"):
        load_image_set(root, R, limits=Limits(max_files=5))
    with pytest.raises(DatasetError, match="max_total_bytes"):
        load_image_set(root, R, limits=Limits(max_total_bytes=200))


# ----------------------------------------------------------------------------- zips


def write_zip(path: Path, entries: dict[str, bytes], symlinks=()) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload in entries.items():
            archive.writestr(zipfile.ZipInfo(name), payload)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, "/etc/passwd")
    return path


def png_bytes(value=100) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("L", (12, 12), value).save(buffer, format="PNG")
    return buffer.getvalue()


def good_entries(prefix="") -> dict[str, bytes]:
    return {f"{prefix}{c}/{i}.png": png_bytes(40 * i) for c in ("ok", "nok") for i in range(2)}


def test_zip_with_wrapper_folder_loads(tmp_path):
    entries = good_entries("export/") | {"__MACOSX/export/._x.png": b"junk", "export/README.md": b"hi"}
    zpath = write_zip(tmp_path / "solar.zip", entries)
    ds = load_image_set(zpath, R)
    assert ds.name == "solar" and ds.class_names == ["nok", "ok"]
    assert ds.files[0] == "export/nok/0.png"
    assert ds.skipped == [("export/README.md", "not inside a class folder")]
    assert load_image_set(str(zpath), R).files == ds.files  # str spec and cache hit agree


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"../evil.png": b"x"}, "'../evil.png'"),
        ({"ok/../../evil.png": b"x"}, "'ok/../../evil.png'"),
        ({"/abs.png": b"x"}, "'/abs.png'"),
        ({"..\\evil.png": b"x"}, "evil.png"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "backslash"],
)
def test_zip_path_traversal_rejected_and_nothing_written(tmp_path, bad, needle):
    zpath = write_zip(tmp_path / "up.zip", good_entries() | bad)
    before = all_files(tmp_path)
    dest = tmp_path / "uploads" / "up"
    with pytest.raises(DatasetError) as info:
        extract_zip_safely(zpath, dest)
    assert needle in str(info.value) and "rejected" in str(info.value)
    assert all_files(tmp_path) - before <= {"uploads"}  # not even the good entries
    assert not (tmp_path / "evil.png").exists() and not Path("/abs.png").exists()
    with pytest.raises(DatasetError, match="evil.png|abs.png"):
        load_image_set(zpath, R)


def test_zip_symlink_rejected(tmp_path):
    zpath = write_zip(tmp_path / "up.zip", good_entries(), symlinks=["ok/link.png"])
    with pytest.raises(DatasetError, match="'ok/link.png' is a symbolic link"):
        extract_zip_safely(zpath, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zip_limits(tmp_path):
    zpath = write_zip(tmp_path / "big.zip", good_entries() | {"ok/pad.bin": b"\0" * 5000})
    with pytest.raises(DatasetError, match="declares .*max_total_bytes"):
        extract_zip_safely(zpath, tmp_path / "out", Limits(max_total_bytes=4000))
    with pytest.raises(DatasetError, match="over the limit of 3 files"):
        extract_zip_safely(zpath, tmp_path / "out", Limits(max_files=3))
    assert not (tmp_path / "out").exists()
    assert extract_zip_safely(zpath, tmp_path / "out") == tmp_path / "out"
    assert len(list((tmp_path / "out").rglob("*.png"))) == 4


def test_zip_lying_about_its_size_rejected(tmp_path):
    # A forged header that declares 10 bytes for 5000: the declared-size check passes, so the
    # extraction itself must stop it (byte count or CRC), leaving nothing behind.
    zpath = write_zip(tmp_path / "lie.zip", good_entries() | {"ok/pad.bin": b"\1" * 5000})
    raw = bytearray(zpath.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = raw.rfind(signature)
        raw[start + offset : start + offset + 4] = struct.pack("<I", 10)
    zpath.write_bytes(bytes(raw))
    assert zipfile.ZipFile(zpath).getinfo("ok/pad.bin").file_size == 10
    with pytest.raises(DatasetError, match="pad.bin"):
        extract_zip_safely(zpath, tmp_path / "out", Limits(max_total_bytes=3000))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_zip_bytes_counted_while_extracting(tmp_path, monkeypatch):
    # Simulate a reader that trusted the declared sizes: the running byte count must still stop it.
    checked = data.checked_zip_members
    monkeypatch.setattr(data, "checked_zip_members", lambda a, n, _: checked(a, n, Limits()))
    zpath = write_zip(tmp_path / "big.zip", good_entries() | {"ok/pad.bin": b"\0" * 5000})
    with pytest.raises(DatasetError, match="more than 4,000 bytes when extracted"):
        extract_zip_safely(zpath, tmp_path / "out", Limits(max_total_bytes=4000))
    assert not (tmp_path / "out").exists()


def test_not_a_zip(tmp_path):
    (tmp_path / "fake.zip").write_bytes(b"hello")
    with pytest.raises(DatasetError, match="fake.zip"):
        load_image_set(tmp_path / "fake.zip", R)


# ----------------------------------------------------------------------------- caching


def test_cache_invalidates_when_folder_changes(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 2})
    first = load_image_set(root, R)
    assert load_image_set(root, R).images is first.images  # in-process hit
    assert list((data.cache_dir() / "datasets").glob("*.pt"))

    clear_memory_cache()
    from_disk = load_image_set(root, R)
    assert from_disk.images is not first.images and torch.equal(from_disk.images, first.images)
    assert from_disk.files == first.files

    save(root / "b" / "new.png", value=9)
    assert len(load_image_set(root, R).files) == 5  # new fingerprint, new key: no stale in-process hit
    clear_memory_cache()
    again = load_image_set(root, R)
    assert "b/new.png" in again.files and again.class_counts() == {"a": 2, "b": 3}
    assert load_image_set(root, 8).resolution == 8  # resolution is part of the key


def test_corrupt_disk_cache_is_rebuilt(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 2})
    first = load_image_set(root, R)
    for path in (data.cache_dir() / "datasets").glob("*.pt"):
        path.write_bytes(b"truncated")
    clear_memory_cache()
    assert torch.equal(load_image_set(root, R).images, first.images)


# ----------------------------------------------------------------------------- splits


def synthetic(counts: list[int]) -> ImageSet:
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    n = len(labels)
    return ImageSet(
        name="syn",
        images=torch.zeros((n, 3, 8, 8), dtype=torch.uint8),
        labels=labels,
        class_names=[f"c{i}" for i in range(len(counts))],
        files=[f"{i}.png" for i in range(n)],
        skipped=[],
    )


def per_class(ds: ImageSet, idx: torch.Tensor) -> list[int]:
    return torch.bincount(ds.labels[idx], minlength=len(ds.class_names)).tolist()


def test_split_disjoint_stratified_deterministic():
    ds = synthetic([40, 13, 3, 2])
    split = split_image_set(ds, test_fraction=0.25, val_fraction=0.1, split_seed=3)
    parts = [set(split.train.tolist()), set(split.val.tolist()), set(split.test.tolist())]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(range(len(ds.labels)))
    assert per_class(ds, split.test) == [10, 3, 1, 1]  # 25% of each class, at least 1
    assert per_class(ds, split.val) == [4, 1, 1, 0]  # 10% of the whole class; >= 1 if class has >= 3
    assert split.sizes() == {"train": 37, "val": 6, "test": 15}
    assert split.train.dtype == torch.int64

    again = split_image_set(ds, test_fraction=0.25, val_fraction=0.1, split_seed=3)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(split, part), getattr(again, part))
    other = split_image_set(ds, test_fraction=0.25, val_fraction=0.1, split_seed=4)
    assert not torch.equal(other.test, split.test)


def test_shots_keep_test_and_val_fixed():
    ds = synthetic([40, 13, 3])
    full = split_image_set(ds, split_seed=1)
    k2 = split_image_set(ds, shots=2, split_seed=1, shot_seed=0)
    k2b = split_image_set(ds, shots=2, split_seed=1, shot_seed=5)
    assert per_class(ds, k2.train) == [2, 2, 1]  # the 3-image class has only one left for train
    assert torch.equal(k2.test, full.test) and torch.equal(k2b.test, full.test)
    assert torch.equal(k2.val, full.val) and torch.equal(k2b.val, full.val)
    assert set(k2.train.tolist()) <= set(full.train.tolist())
    assert not torch.equal(k2.train, k2b.train)
    assert torch.equal(k2.train, split_image_set(ds, shots=2, split_seed=1, shot_seed=0).train)
    assert per_class(ds, split_image_set(ds, shots=100).train) == per_class(ds, full.train)


def test_impossible_splits_raise():
    with pytest.raises(DatasetError, match="class 'c1' has only 1 image"):
        split_image_set(synthetic([5, 1]))
    for kwargs in ({"test_fraction": 0}, {"test_fraction": 0.6, "val_fraction": 0.4}, {"shots": 0}):
        with pytest.raises(DatasetError):
            split_image_set(synthetic([5, 5]), **kwargs)


# ----------------------------------------------------------------------------- normalize


def test_normalize_matches_manual_math():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = normalize(x, mean, std)
    m, s = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (mean, std))
    manual = (x.double() / 255 - m) / s
    assert out.dtype == torch.float32 and torch.allclose(out.double(), manual, atol=1e-6)
    assert x.dtype == torch.uint8  # input untouched
    with pytest.raises(TypeError):
        normalize(out, mean, std)


# ----------------------------------------------------------------------------- real ELPV


def test_elpv_real_data():
    ds = load_image_set("elpv", 112)
    assert ds.images.shape == (2624, 3, 112, 112) and ds.images.dtype == torch.uint8
    assert ds.class_counts() == {"p=0": 1508, "p=1/3": 295, "p=2/3": 106, "p=1": 715}
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])  # grey replicated
    assert ds.license.startswith("CC BY-NC-SA 4.0") and ds.files[0] == "images/cell0001.png"
    binary = load_image_set("elpv-binary", 112)
    assert binary.class_counts() == {"functional": 1803, "defective": 821}
    mono = load_image_set("elpv", 112, cell_type="mono")
    poly = load_image_set("elpv-binary", 112, cell_type="poly")
    assert len(mono.files) == 1074 and len(poly.files) == 1550
    assert mono.images.shape == (1074, 3, 112, 112)
    assert poly.class_counts() == {"functional": 1098, "defective": 452}
    i = ds.files.index(mono.files[10])
    assert torch.equal(mono.images[10], ds.images[i]) and mono.labels[10] == ds.labels[i]
