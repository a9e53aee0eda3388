"""Image sets for prompt tuning: the built-in ELPV solar-cell set, ImageFolder folders and zips.

Every set is decoded once into a `uint8 (N, 3, R, R)` tensor (grey replicated to 3 channels, square
bilinear resize with antialiasing) and cached twice: in process (small LRU) and on disk under
`cache_dir()/"datasets"`, so a fresh process loads ELPV from one `torch.load`.

User data is untrusted (the dashboard accepts uploads), hence the `Limits`, the zip checks and the
policy "skip what cannot be used, say why in `ImageSet.skipped`, raise `DatasetError` when the rest
is not a usable classification set".
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import math
import os
import shutil
import stat
import tempfile
import threading
import unicodedata
import uuid
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np
import PIL
import torch
from PIL import Image, ImageOps

from vptdash.engine.paths import cache_dir

__all__ = [
    "BUILTIN_DATASETS",
    "ELPV_LICENSE",
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "ImageSet",
    "Limits",
    "Split",
    "clear_memory_cache",
    "draw_image_folder",
    "extract_zip_safely",
    "load_image_set",
    "normalize",
    "split_image_set",
]


class DatasetError(ValueError):
    """A data set cannot be used; the message says what was wrong and with which file."""


BUILTIN_DATASETS: dict[str, str] = {
    "elpv": "ELPV solar cells (2,624 EL images, 300x300 grey), 4 classes by defect probability 0, 1/3, 2/3, 1",
    "elpv-binary": "ELPV solar cells, 2 classes: functional (p <= 0.5) / defective (p > 0.5)",
}

ELPV_LICENSE = (
    "CC BY-NC-SA 4.0 (non-commercial). ELPV dataset by C. Buerhop-Lutz, S. Deitsch et al., "
    "ZAE Bayern / FAU Erlangen-Nuremberg, https://github.com/zae-bayern/elpv-dataset"
)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# OS clutter that users never meant as data: ignored without a note in `skipped`.
_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})

_ELPV_CLASSES = ["p=0", "p=1/3", "p=2/3", "p=1"]
_ELPV_BINARY_CLASSES = ["functional", "defective"]
_CELL_TYPES = ("mono", "poly")

# Bump when the decoded representation changes, so stale disk caches are never read.
_CACHE_FORMAT = 2  # 2: EXIF orientation applied


@dataclass(frozen=True)
class Limits:
    """Safety limits for user data (uploads are untrusted)."""

    max_files: int = 20000
    max_total_bytes: int = 2 * 1024**3  # uncompressed bytes in a zip / files in a folder
    max_image_pixels: int = 50_000_000  # per image: decompression-bomb guard
    min_classes: int = 2
    min_images_per_class: int = 2

    def __post_init__(self) -> None:
        for name in ("max_files", "max_total_bytes", "max_image_pixels", "min_images_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1")
        if self.min_classes < 2:
            raise ValueError("Limits.min_classes must be >= 2 (a classifier needs two classes)")


@dataclass
class ImageSet:
    name: str
    images: torch.Tensor  # uint8 (N, 3, R, R); shared with the cache: treat as read-only
    labels: torch.Tensor  # int64 (N,)
    class_names: list[str]
    files: list[str]  # one identifier (relative path) per image, same order as `images`
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    license: str | None = None
    source: str = ""

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        return dict(zip(self.class_names, counts))

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def __repr__(self) -> str:
        # The dataclass default would print the whole tensor (and Streamlit shows reprs).
        return (
            f"ImageSet(name={self.name!r}, n={len(self.labels)}, resolution={self.resolution}, "
            f"classes={self.class_counts()}, skipped={len(self.skipped)})"
        )


# --------------------------------------------------------------------------------------------
# public entry points


def load_image_set(
    spec: str | Path,
    resolution: int = 112,
    *,
    cell_type: str | None = None,
    limits: Limits = Limits(),
) -> ImageSet:
    """Load "elpv", "elpv-binary", an ImageFolder folder (root/<class>/<images>) or a .zip of one.

    A plain string naming a built-in set wins over a folder of the same name; pass a `Path` to
    mean the folder. `cell_type` ("mono"/"poly") filters ELPV and is an error for other specs.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 8 <= resolution <= 4096:
        raise DatasetError(f"resolution must be an integer between 8 and 4096, got {resolution!r}")
    if cell_type is not None and cell_type not in _CELL_TYPES:
        raise DatasetError(f"cell_type must be None, 'mono' or 'poly', got {cell_type!r}")
    if isinstance(spec, str) and spec in BUILTIN_DATASETS:
        return _load_elpv(binary=spec == "elpv-binary", resolution=resolution, cell_type=cell_type)
    if cell_type is not None:
        raise DatasetError(f"cell_type={cell_type!r} applies only to the built-in ELPV sets, not {spec!s}")

    path = Path(spec).expanduser()
    if not path.exists():
        raise DatasetError(
            f"dataset not found: {str(spec)!r} is neither a built-in set "
            f"({', '.join(BUILTIN_DATASETS)}) nor an existing folder or .zip file"
        )
    path = path.resolve()
    if path.is_dir():
        return _load_folder(path, resolution, limits)
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        return _load_zip(path, resolution, limits)
    raise DatasetError(f"{path}: expected a folder (root/<class>/<images>) or a .zip of one")


def extract_zip_safely(zip_path: Path, dest: Path, limits: Limits = Limits()) -> Path:
    """Extract `zip_path` into the new folder `dest` and return `dest`.

    Every entry is checked before anything is written, so a zip with one bad entry (absolute
    path, `..`, symlink, encryption) is rejected whole. Sizes are checked twice: the declared
    sizes up front, and the bytes actually written (declared sizes can lie). Extraction goes to
    a temporary sibling that is renamed into place, so a failure leaves nothing behind and no
    half-extracted upload is ever visible.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DatasetError(f"{dest}: extraction target must be a new or empty folder")
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{zip_path.name}: not a readable zip file ({exc})") from exc
    with archive:
        members = checked_zip_members(archive, zip_path.name, limits)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        try:
            _extract_members(archive, members, partial, zip_path.name, limits)
            if dest.exists():
                dest.rmdir()  # empty (checked above); os.replace needs it gone
            os.replace(partial, dest)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return dest


def draw_image_folder(
    folder: Path, class_names: Sequence[str], per_class: int, draw: Callable[[int], np.ndarray]
) -> Path:
    """A generated set as an ImageFolder (a folder of PNGs per class; `draw(c)` gives one grey image of class
    c, values in [0, 1]), drawn once: into a private sibling first, then renamed into place, so a concurrent
    reader sees no folder or a whole one. Returns the folder."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    for c, name in enumerate(class_names):
        (partial / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (np.clip(draw(c), 0, 1) * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(partial / name / f"{i:03d}.png")
    try:
        os.replace(partial, folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another process drew it first
    return folder


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float32 `(x / 255 - mean) / std` per channel, on the input's device."""
    # Only uint8 is accepted so that normalising twice fails loudly instead of training on noise.
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images_uint8.dtype}")
    channels = images_uint8.shape[-3]
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images_uint8.device).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images_uint8.device).reshape(-1, 1, 1)
    if mean_t.shape[0] != channels or std_t.shape[0] != channels:
        raise ValueError(f"mean/std need {channels} values, got {len(mean_t)} and {len(std_t)}")
    return images_uint8.to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t)


@dataclass
class Split:
    train: torch.Tensor  # int64 indices into the ImageSet, ascending
    val: torch.Tensor
    test: torch.Tensor

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def split_image_set(
    ds: ImageSet,
    *,
    test_fraction: float = 0.25,
    val_fraction: float = 0.1,
    shots: int | None = None,
    split_seed: int = 0,
    shot_seed: int = 0,
) -> Split:
    """Stratified test / val / train split; `shots=k` keeps k training images per class.

    Test and val depend only on the data and `split_seed`, so runs that differ in shots or
    `shot_seed` are evaluated on the same images (ELPV paper: fixed 75/25 protocol).
    """
    _check_split_args(test_fraction, val_fraction, shots)
    train, val, test = [], [], []
    labels = ds.labels.cpu().numpy()
    for class_index, class_name in enumerate(ds.class_names):
        members = np.flatnonzero(labels == class_index)
        if len(members) == 0:
            continue
        n_test, n_val = _class_split_sizes(len(members), test_fraction, val_fraction, class_name)
        # One generator per (seed, class): a class's split does not depend on the other classes.
        order = members[np.random.default_rng([split_seed, class_index]).permutation(len(members))]
        test.append(order[:n_test])
        val.append(order[n_test : n_test + n_val])
        rest = np.sort(order[n_test + n_val :])
        if shots is not None:
            picked = np.random.default_rng([shot_seed, class_index, 1]).permutation(len(rest))
            rest = rest[picked[:shots]]
        train.append(rest)
    return Split(train=_as_index(train), val=_as_index(val), test=_as_index(test))


def load_and_split(config, resolution: int | None = None) -> tuple[ImageSet, Split]:
    """A run's image set and its split, from its configuration (anything with dataset, cell_type,
    resolution, test_fraction, val_fraction, shots, split_seed and seed): the one place that decides
    which images a run's training, evaluation, scoring, whitening and attention read. `resolution`
    overrides the configuration's (a CLIP model's own input size)."""
    image_set = load_image_set(config.dataset, resolution or config.resolution, cell_type=config.cell_type)
    split = split_image_set(
        image_set,
        test_fraction=config.test_fraction,
        val_fraction=config.val_fraction,
        shots=config.shots,
        split_seed=config.split_seed,
        shot_seed=config.seed,
    )
    return image_set, split


def clear_memory_cache() -> None:
    """Forget the in-process decoded sets (the disk cache stays)."""
    with _MEMORY_LOCK:
        _MEMORY.clear()


# --------------------------------------------------------------------------------------------
# splits


def _check_split_args(test_fraction: float, val_fraction: float, shots: int | None) -> None:
    if not 0 < test_fraction < 1:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise DatasetError(
            f"val_fraction must be in [0, 1) with test_fraction + val_fraction < 1, "
            f"got {val_fraction} and {test_fraction}"
        )
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise DatasetError(f"shots must be None or a positive integer, got {shots!r}")


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even, which makes sizes jump unpredictably between classes.
    return int(math.floor(x + 0.5))


def _class_split_sizes(n: int, test_fraction: float, val_fraction: float, class_name: str) -> tuple[int, int]:
    if n < 2:
        raise DatasetError(f"class '{class_name}' has only {n} image; need at least 2 to have both train and test")
    n_test = min(max(_round_half_up(test_fraction * n), 1), n - 1)
    n_val = _round_half_up(val_fraction * n)
    if val_fraction > 0 and n >= 3:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - n_test - 1)  # train keeps at least one image
    return n_test, n_val


def _as_index(parts: list[np.ndarray]) -> torch.Tensor:
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    return torch.from_numpy(np.sort(np.concatenate(parts)).astype(np.int64))


# --------------------------------------------------------------------------------------------
# caching: in-process LRU + torch.save files, both keyed by everything that changes the pixels

_MEMORY: OrderedDict[str, dict] = OrderedDict()
_MEMORY_LOCK = threading.Lock()
_MEMORY_MAX_ENTRIES = 4
_MEMORY_MAX_BYTES = 2 * 1024**3


def _cache_key(*parts: object) -> str:
    text = repr((_CACHE_FORMAT, PIL.__version__, *parts))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _cached_payload(key: str, build: Callable[[], dict]) -> dict:
    with _MEMORY_LOCK:
        if key in _MEMORY:
            _MEMORY.move_to_end(key)
            return _MEMORY[key]
    payload = _read_disk_cache(key)
    if payload is None:
        payload = build()
        _write_disk_cache(key, payload)
    _remember(key, payload)
    return payload


def _remember(key: str, payload: dict) -> None:
    with _MEMORY_LOCK:
        _MEMORY[key] = payload
        _MEMORY.move_to_end(key)
        total = sum(p["images"].numel() for p in _MEMORY.values())
        while len(_MEMORY) > 1 and (len(_MEMORY) > _MEMORY_MAX_ENTRIES or total > _MEMORY_MAX_BYTES):
            _, dropped = _MEMORY.popitem(last=False)
            total -= dropped["images"].numel()


def _disk_cache_path(key: str) -> Path:
    return cache_dir() / "datasets" / f"{key}.pt"


def _read_disk_cache(key: str) -> dict | None:
    path = _disk_cache_path(key)
    if not path.exists():
        return None
    try:
        payload = torch.load(path, weights_only=True)
        payload["skipped"] = [tuple(item) for item in payload["skipped"]]
        return payload
    except Exception:  # noqa: BLE001 - a corrupt cache file is rebuilt, never fatal
        path.unlink(missing_ok=True)
        return None


def _write_disk_cache(key: str, payload: dict) -> None:
    """Best effort: a full or read-only cache only costs speed, and leaves no partial file."""
    path = _disk_cache_path(key)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)  # a full disk raises RuntimeError from torch's zip writer, not OSError
        os.replace(tmp, path)  # atomic: concurrent readers see the old file or the new, never half
    except (OSError, RuntimeError):
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _payload(
    images: torch.Tensor,
    labels: list[int],
    class_names: list[str],
    files: list[str],
    skipped: list[tuple[str, str]],
    extra: dict | None = None,
) -> dict:
    return {
        "images": images,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "class_names": list(class_names),
        "files": list(files),
        "skipped": list(skipped),
        "extra": extra or {},
    }


def _image_set(payload: dict, name: str, source: str, license: str | None = None) -> ImageSet:
    # Fresh lists so callers cannot edit the cached payload; tensors are shared (read-only).
    return ImageSet(
        name=name,
        images=payload["images"],
        labels=payload["labels"],
        class_names=list(payload["class_names"]),
        files=list(payload["files"]),
        skipped=list(payload["skipped"]),
        license=license,
        source=source,
    )


# --------------------------------------------------------------------------------------------
# decoding


class _Unusable(Exception):
    """An image file that is skipped; the message is the reason shown to the user."""


def decode_image_bytes(payload: bytes, resolution: int, limits: Limits | None = None) -> torch.Tensor:
    """One image from bytes, decoded exactly like every data set image: (1, 3, R, R) uint8.
    DatasetError (with the reason a data set would skip it) when it cannot be used."""
    try:
        pixels = _decode_image(io.BytesIO(payload), resolution, (limits or Limits()).max_image_pixels)
    except _Unusable as exc:
        raise DatasetError(str(exc)) from None
    tensor = torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True))
    tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor[None].expand(3, -1, -1)
    return tensor.contiguous()[None]


def _decode_workers() -> int:
    # PIL releases the GIL while decoding and resizing, so threads scale with cores.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


def _decode_all(paths: list[Path], resolution: int, max_pixels: int) -> tuple[torch.Tensor, list[str | None]]:
    """Decode `paths` into one uint8 (n, 3, R, R) tensor; `reasons[i]` is None when image i is usable."""
    images = torch.zeros((len(paths), 3, resolution, resolution), dtype=torch.uint8)
    out = images.numpy()  # shares memory: each worker writes its own slot, no stacking copy

    def decode_one(i: int) -> str | None:
        try:
            pixels = _decode_image(paths[i], resolution, max_pixels)
        except _Unusable as exc:
            return str(exc)
        out[i] = pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels[None]
        return None

    with ThreadPoolExecutor(max_workers=_decode_workers()) as pool:
        reasons = list(pool.map(decode_one, range(len(paths))))
    return images, reasons


def _decode_image(path: Path, resolution: int, max_pixels: int) -> np.ndarray:
    """(R, R) grey or (R, R, 3) RGB uint8, or raise _Unusable with the reason."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            # Checked on the header, before any pixel is decoded. PIL's own global
            # MAX_IMAGE_PIXELS guard stays in force too; it is not changed here because it is
            # process-wide and decoding runs in threads.
            if width * height > max_pixels:
                raise _Unusable(
                    f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                    f"{max_pixels:,} (possible decompression bomb)"
                )
            if im.format == "JPEG":
                im.draft(None, (resolution, resolution))  # decode big JPEGs at 1/2..1/8 scale
            # Cameras store portrait shots sideways plus an orientation tag; viewers apply it, so must we.
            im = ImageOps.exif_transpose(im)
            im = _grey_or_rgb(im)
            im = im.resize((resolution, resolution), Image.Resampling.BILINEAR)  # antialiased
            return np.asarray(im, dtype=np.uint8)
    except _Unusable:
        raise
    except Image.DecompressionBombError as exc:
        raise _Unusable(f"decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise _Unusable("cannot identify image file (not an image or unsupported format)") from exc
    except Exception as exc:  # noqa: BLE001 - untrusted files make PIL raise many kinds of errors
        raise _Unusable(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def _grey_or_rgb(im: Image.Image) -> Image.Image:
    """Bring any PIL mode to "L" or "RGB"; grey stays one channel until replicated at the end."""
    if im.mode in ("L", "RGB"):
        return im
    if im.mode == "1":
        return im.convert("L")
    if im.mode.startswith("I") or im.mode == "F":
        return _stretch_to_l(im)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        # Composite on black: what transparent pixels hide is often junk, black is predictable.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV


def _stretch_to_l(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grey to 8 bits, stretched per image.

    The bits actually used are unknown (12-bit sensors store in 16-bit files), so scaling by the
    type's maximum would often give near-black images; a min-max stretch always uses the range.
    """
    values = np.asarray(im).astype(np.float32)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


# --------------------------------------------------------------------------------------------
# ELPV (installed wheel `elpv-dataset`)


def _elpv_dir() -> Path:
    try:
        import elpv_dataset  # noqa: PLC0415 - the ELPV wheel is needed only when ELPV is used
    except ImportError as exc:
        raise DatasetError("the ELPV set needs the package 'elpv-dataset' (pip install elpv-dataset)") from exc
    return Path(elpv_dataset.__file__).parent / "data"


def _read_elpv_labels(labels_csv: Path) -> list[tuple[str, float, str]]:
    """Rows (relative image path, defect probability, "mono"/"poly") of the whitespace CSV."""
    rows = []
    for line_no, line in enumerate(labels_csv.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            path, probability, kind = parts[0], float(parts[1]), parts[2]
        except (IndexError, ValueError) as exc:
            raise DatasetError(f"{labels_csv}:{line_no}: expected 'path probability type': {line!r}") from exc
        on_grid = abs(probability * 3 - round(probability * 3)) < 1e-6  # 0, 1/3, 2/3, 1
        if not (on_grid and 0 <= probability <= 1 and kind in _CELL_TYPES):
            raise DatasetError(f"{labels_csv}:{line_no}: unexpected label {line!r}")
        rows.append((path, probability, kind))
    return rows


def _load_elpv(binary: bool, resolution: int, cell_type: str | None) -> ImageSet:
    data_dir = _elpv_dir()
    labels_csv = data_dir / "labels.csv"
    if not labels_csv.is_file():
        raise DatasetError(f"ELPV labels not found: {labels_csv}")
    version = importlib.metadata.version("elpv-dataset")
    csv_stat = labels_csv.stat()
    # One decoded copy per resolution serves all four views (4-class/binary x cell types).
    key = _cache_key("elpv", version, csv_stat.st_size, csv_stat.st_mtime_ns, resolution)
    payload = _cached_payload(key, lambda: _build_elpv(data_dir, labels_csv, resolution))
    return _elpv_view(payload, binary, cell_type, version)


def _build_elpv(data_dir: Path, labels_csv: Path, resolution: int) -> dict:
    rows = _read_elpv_labels(labels_csv)
    # The wheel is trusted data, so only PIL's own pixel guard applies.
    paths = [data_dir / path for path, _, _ in rows]
    images, reasons = _decode_all(paths, resolution, Image.MAX_IMAGE_PIXELS)
    keep = [i for i, reason in enumerate(reasons) if reason is None]
    skipped = [(rows[i][0], reason) for i, reason in enumerate(reasons) if reason is not None]
    if not keep:
        raise DatasetError(f"no ELPV image could be decoded from {data_dir}")
    kept = [rows[i] for i in keep]
    return _payload(
        images[keep] if len(keep) < len(rows) else images,
        labels=[_round_half_up(p * 3) for _, p, _ in kept],
        class_names=_ELPV_CLASSES,
        files=[path for path, _, _ in kept],
        skipped=skipped,
        extra={
            "probability": torch.tensor([p for _, p, _ in kept], dtype=torch.float64),
            "cell_type": [kind for _, _, kind in kept],
        },
    )


def _elpv_view(payload: dict, binary: bool, cell_type: str | None, version: str) -> ImageSet:
    probability = payload["extra"]["probability"]
    if cell_type is None:
        selected = torch.arange(len(probability))
    else:
        kinds = payload["extra"]["cell_type"]
        selected = torch.tensor([i for i, kind in enumerate(kinds) if kind == cell_type], dtype=torch.int64)
    if binary:
        labels = (probability[selected] > 0.5).to(torch.int64)
        class_names = _ELPV_BINARY_CLASSES
    else:
        labels = payload["labels"][selected]
        class_names = _ELPV_CLASSES
    whole = cell_type is None
    source = f"elpv-dataset {version} (installed wheel)" + ("" if whole else f", {cell_type} cells only")
    return ImageSet(
        name="elpv-binary" if binary else "elpv",
        images=payload["images"] if whole else payload["images"][selected],
        labels=labels,
        class_names=list(class_names),
        files=[payload["files"][i] for i in selected.tolist()],
        skipped=list(payload["skipped"]),
        license=ELPV_LICENSE,
        source=source,
    )


# --------------------------------------------------------------------------------------------
# ImageFolder folders and zips


@dataclass
class _Listing:
    """What a folder holds, before decoding."""

    root: Path
    classes: list[tuple[str, list[str]]]  # (class name, image paths relative to root), sorted
    skipped: list[tuple[str, str]]
    fingerprint: str  # changes when any file is added, removed, resized or touched


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_NAMES


def _class_key(name: str) -> str:
    # NFC: macOS writes decomposed accents in zips, which must match the composed spelling.
    return unicodedata.normalize("NFC", name).strip().casefold()


def _visible_children(folder: Path) -> tuple[list[Path], list[Path]]:
    dirs, files = [], []
    for child in sorted(folder.iterdir(), key=lambda p: p.name):
        if _is_junk(child.name):
            continue
        (dirs if child.is_dir() else files).append(child)
    return dirs, files


def unwrap_wrapper_folders(root: Path) -> Path:
    """Descend through single wrapper folders (zip of "dataset/<class>/..."); uploads use it too, so an
    upload's classes are exactly what the loader will see."""
    base = root
    for _ in range(4):
        dirs, files = _visible_children(base)
        if len(dirs) != 1 or files or not _visible_children(dirs[0])[0]:
            break
        base = dirs[0]
    return base


class _Budget:
    """Counts files and bytes while listing, failing as soon as a limit is passed."""

    def __init__(self, root: Path, limits: Limits):
        self.root, self.limits, self.files, self.bytes = root, limits, 0, 0

    def add(self, rel: str, size: int) -> None:
        self.files += 1
        self.bytes += size
        if self.files > self.limits.max_files:
            raise DatasetError(f"{self.root}: more than {self.limits.max_files} files (limit max_files)")
        if self.bytes > self.limits.max_total_bytes:
            raise DatasetError(
                f"{self.root}: files add up to more than {self.limits.max_total_bytes:,} bytes "
                f"(limit max_total_bytes), passed at {rel}"
            )


def _scan_folder(root: Path, limits: Limits) -> _Listing:
    base = unwrap_wrapper_folders(root)
    budget = _Budget(root, limits)
    digest = hashlib.sha256()
    skipped: list[tuple[str, str]] = []
    by_key: dict[str, tuple[str, list[str]]] = {}

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    def note_file(path: Path) -> os.stat_result | None:
        try:
            info = path.stat()
        except OSError as exc:  # broken symlink, permissions
            skipped.append((rel(path), f"cannot read file: {exc.strerror or exc}"))
            return None
        budget.add(rel(path), info.st_size)
        digest.update(f"{rel(path)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        return info

    class_dirs, root_files = _visible_children(base)
    for path in root_files:
        if note_file(path) is not None:
            skipped.append((rel(path), "not inside a class folder"))
    for class_dir in class_dirs:
        key = _class_key(class_dir.name)
        if not key:
            raise DatasetError(f"class folder {rel(class_dir)!r} has an empty name")
        if key in by_key:
            raise DatasetError(
                f"class folders {by_key[key][0]!r} and {class_dir.name!r} collide: class names are "
                f"compared ignoring case and surrounding spaces; rename or merge one"
            )
        digest.update(f"{rel(class_dir)}/\n".encode())
        images = _scan_class(class_dir, note_file, rel, skipped)
        by_key[key] = (class_dir.name, images)
        if not images:
            skipped.append((rel(class_dir) + "/", "empty class folder (no image files); class ignored"))
    classes = [(by_key[k][0].strip(), by_key[k][1]) for k in sorted(by_key) if by_key[k][1]]
    return _Listing(root=root, classes=classes, skipped=skipped, fingerprint=digest.hexdigest())


def _scan_class(class_dir: Path, note_file, rel, skipped: list[tuple[str, str]]) -> list[str]:
    """Image files anywhere below one class folder (nested folders count, as in ImageFolder)."""
    images = []
    for current, dirnames, filenames in os.walk(class_dir):  # does not follow folder symlinks
        here = Path(current)
        dirnames[:] = sorted(d for d in dirnames if not _is_junk(d))
        for d in dirnames:
            if (here / d).is_symlink():
                skipped.append((rel(here / d) + "/", "symbolic link to a folder (not followed)"))
        for filename in sorted(filenames):
            if _is_junk(filename):
                continue
            path = here / filename
            if note_file(path) is None:
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(rel(path))
            else:
                skipped.append((rel(path), f"not an image file (extension {path.suffix or 'none'!r})"))
    return images


def _check_classes(counts: dict[str, int], where: str, limits: Limits) -> None:
    if len(counts) < limits.min_classes:
        if len(counts) == 1:
            found = f"only one class '{next(iter(counts))}'"
        else:
            found = f"only {len(counts)} classes ({', '.join(repr(c) for c in counts)})"
        raise DatasetError(f"{where}: found {found}; need at least {limits.min_classes}")
    for name, count in counts.items():
        if count < limits.min_images_per_class:
            raise DatasetError(
                f"{where}: class '{name}' has only {count} usable image(s); need at least {limits.min_images_per_class}"
            )


def _build_folder(listing: _Listing, resolution: int, limits: Limits, where: str) -> dict:
    if not listing.classes:
        raise DatasetError(
            f"{where}: no image files found (expected <root>/<class>/<images> with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    _check_classes({name: len(files) for name, files in listing.classes}, where, limits)
    entries = [(label, f) for label, (_, files) in enumerate(listing.classes) for f in files]
    images, reasons = _decode_all([listing.root / f for _, f in entries], resolution, limits.max_image_pixels)
    skipped = list(listing.skipped) + [(f, r) for (_, f), r in zip(entries, reasons) if r is not None]
    keep = [i for i, r in enumerate(reasons) if r is None]
    if not keep:
        problems = "; ".join(f"{f}: {r}" for (_, f), r in list(zip(entries, reasons))[:3])
        raise DatasetError(f"{where}: none of the {len(entries)} image files could be used ({problems})")
    return _relabel(images, entries, keep, listing.classes, skipped, where, limits)


def _relabel(images, entries, keep, classes, skipped, where, limits) -> dict:
    """Drop classes whose every image failed to decode, then number the rest 0..C-1."""
    used = sorted({entries[i][0] for i in keep})
    for label, (name, files) in enumerate(classes):
        if label not in used:
            skipped.append((f"{name}/", "no decodable images in class folder; class ignored"))
    new_label = {old: new for new, old in enumerate(used)}
    labels = [new_label[entries[i][0]] for i in keep]
    class_names = [classes[old][0] for old in used]
    _check_classes(dict(zip(class_names, np.bincount(labels, minlength=len(used)).tolist())), where, limits)
    kept_images = images if len(keep) == len(entries) else images[keep]
    return _payload(kept_images, labels, class_names, [entries[i][1] for i in keep], skipped)


def _load_folder(root: Path, resolution: int, limits: Limits) -> ImageSet:
    listing = _scan_folder(root, limits)
    key = _cache_key("folder", str(root), listing.fingerprint, resolution, limits)
    payload = _cached_payload(key, lambda: _build_folder(listing, resolution, limits, str(root)))
    return _image_set(payload, name=root.name, source=f"folder {root}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_ZIP_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: hash each zip once


def _zip_fingerprint(zip_path: Path) -> str:
    info = zip_path.stat()
    memo_key = (str(zip_path), info.st_size, info.st_mtime_ns)
    if memo_key not in _ZIP_HASHES:
        _ZIP_HASHES[memo_key] = _file_sha256(zip_path)
    return _ZIP_HASHES[memo_key]


def _load_zip(zip_path: Path, resolution: int, limits: Limits) -> ImageSet:
    # Content hash, not mtime: the same upload saved twice should hit the cache.
    key = _cache_key("zip", _zip_fingerprint(zip_path), resolution, limits)

    def build() -> dict:
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            root = extract_zip_safely(zip_path, Path(tmp) / "x", limits)
            return _build_folder(_scan_folder(root, limits), resolution, limits, zip_path.name)

    payload = _cached_payload(key, build)
    return _image_set(payload, name=zip_path.stem, source=f"zip {zip_path}")


# --------------------------------------------------------------------------------------------
# zip safety


def _entry_parts(info: zipfile.ZipInfo, zip_name: str) -> tuple[str, ...]:
    """The entry's path segments, or DatasetError when the entry could escape the target."""
    name = info.filename
    posix = name.replace("\\", "/")  # Windows zips may use backslashes as separators
    unsafe = None
    if "\0" in name:
        unsafe = "contains a NUL character"
    elif posix.startswith("/") or PurePosixPath(posix).is_absolute() or (len(posix) > 1 and posix[1] == ":"):
        unsafe = "has an absolute path"
    elif ".." in posix.split("/"):
        unsafe = "points outside the extraction folder ('..')"
    elif stat.S_ISLNK(info.external_attr >> 16):
        unsafe = "is a symbolic link"
    elif info.flag_bits & 0x1:
        unsafe = "is encrypted"
    if unsafe:
        raise DatasetError(f"unsafe zip {zip_name}: entry {name!r} {unsafe}; the whole zip was rejected")
    return tuple(part for part in posix.split("/") if part not in ("", "."))


def checked_zip_members(
    archive: zipfile.ZipFile, zip_name: str, limits: Limits
) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Entries to extract with their path segments; raises before anything is written."""
    infos = archive.infolist()
    files = [info for info in infos if not info.is_dir()]
    # Directory entries are cheap but not free: cap them too so a zip of empty folders can't stall us.
    if len(files) > limits.max_files or len(infos) > 2 * limits.max_files:
        raise DatasetError(
            f"{zip_name}: {len(files)} files / {len(infos)} entries, over the limit of "
            f"{limits.max_files} files (max_files)"
        )
    declared = sum(info.file_size for info in files)
    if declared > limits.max_total_bytes:
        raise DatasetError(
            f"{zip_name}: declares {declared:,} uncompressed bytes, over the limit of "
            f"{limits.max_total_bytes:,} (max_total_bytes)"
        )
    members = [(info, _entry_parts(info, zip_name)) for info in infos]  # raises on any unsafe entry
    return [(info, parts) for info, parts in members if parts and not any(_is_junk(p) for p in parts)]


def _extract_members(archive, members, target: Path, zip_name: str, limits: Limits) -> None:
    target_resolved = target.resolve()
    written = 0
    for info, parts in members:
        out = target.joinpath(*parts)
        # Defence in depth: the name checks above should make this impossible.
        if not out.resolve().is_relative_to(target_resolved):
            raise DatasetError(f"unsafe zip {zip_name}: entry {info.filename!r} escapes the target")
        if info.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            continue
        try:
            written = _extract_file(archive, info, out, written, zip_name, limits)
        except DatasetError:
            raise
        except FileExistsError as exc:
            raise DatasetError(f"{zip_name}: entry {info.filename!r} appears twice") from exc
        except Exception as exc:  # noqa: BLE001 - CRC errors, bad compression, file/folder clashes
            raise DatasetError(f"{zip_name}: cannot extract entry {info.filename!r}: {exc}") from exc


def _extract_file(archive, info, out: Path, written: int, zip_name: str, limits: Limits) -> int:
    """Copy one entry, returning the running byte total."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(info) as src, open(out, "xb") as dst:
        while block := src.read(1 << 20):
            # Count real bytes: a forged header can declare small sizes for huge content.
            written += len(block)
            if written > limits.max_total_bytes:
                raise DatasetError(
                    f"{zip_name}: more than {limits.max_total_bytes:,} bytes when extracted "
                    f"(limit max_total_bytes), passed at entry {info.filename!r}"
                )
            dst.write(block)
    return written
