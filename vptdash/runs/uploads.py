"""The dashboard's own image sets, kept between sessions under `paths.uploads_dir()/<slug>/`.

Layout: `<slug>/<class>/<file>` (ImageFolder), plus `<slug>/.upload.json` (name, created_at,
n_images, classes, skipped). The metadata file starts with a dot so the data loader ignores it
(a visible file at the root would be reported as "not inside a class folder" on every load).

Every upload is built in a hidden staging folder, validated with `data.load_image_set`, and only
then renamed into place: a failed or concurrent upload never leaves half a data set, and two
uploads with the same name get different slugs ("name", "name-2", ...) because the final rename
fails when the folder already exists.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import unicodedata
import uuid
import zipfile
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path, PurePosixPath, PureWindowsPath

from vptdash.engine import data, paths

META_FILE = ".upload.json"
LEGACY_META_FILE = "upload.json"
STAGING_PREFIX = ".staging-"
STAGING_MAX_AGE_S = 6 * 3600  # staging folders older than this are leftovers of a crashed process
VALIDATION_RESOLUTION = 32  # decoding at a small size is enough to know every image is usable
MAX_SLUG_LENGTH = 48


@dataclass
class UploadInfo:
    name: str
    slug: str
    path: Path
    created_at: float
    n_images: int
    classes: dict[str, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- names
def slugify(name: str) -> str:
    """A safe folder name: ASCII letters, digits, "-" and "_"; never empty, never dotted."""
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9_-]+", "-", text.strip().lower()).strip("-_")
    return text[:MAX_SLUG_LENGTH].strip("-_") or "dataset"


def _safe_filename(filename: str, taken: set[str]) -> str:
    """Basename only (either separator), no leading dots, unique within its class (case-insensitive)."""
    base = PureWindowsPath(PurePosixPath(str(filename).replace("\0", "")).name).name
    base = unicodedata.normalize("NFC", base).strip().lstrip(".")
    base = re.sub(r'[<>:"/\\|?*\x00-\x1f]', "_", base) or "image"
    stem, suffix = os.path.splitext(base)
    stem, suffix = stem[:100] or "image", suffix[:10]
    candidate, counter = f"{stem}{suffix}", 2
    while candidate.casefold() in taken:
        candidate = f"{stem}-{counter}{suffix}"
        counter += 1
    taken.add(candidate.casefold())
    return candidate


def _safe_class_name(class_name: str) -> str:
    name = unicodedata.normalize("NFC", str(class_name)).replace("\0", "").strip()
    name = re.sub(r'[<>:"/\\|?*\x00-\x1f]', "_", name).strip().lstrip(".").strip()
    if not name:
        raise data.DatasetError(f"class name {class_name!r} is empty once cleaned; give each class a name")
    return name[:100]


# ---------------------------------------------------------------------------------------- staging
def _new_staging() -> Path:
    root = paths.uploads_dir()
    _remove_stale_staging(root)
    staging = root / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    return staging


def _remove_stale_staging(root: Path) -> None:
    now = time.time()
    for child in root.glob(f"{STAGING_PREFIX}*"):
        try:
            if now - child.stat().st_mtime > STAGING_MAX_AGE_S:
                shutil.rmtree(child, ignore_errors=True)
        except OSError:
            pass


def _finish(name: str, staging: Path, dataset_dir: Path) -> UploadInfo:
    """Validate `dataset_dir` (inside `staging`), write the metadata, rename it into place under a
    free slug, and remove the staging folder whatever happens."""
    try:
        try:
            image_set = data.load_image_set(dataset_dir, VALIDATION_RESOLUTION)
        except data.DatasetError as exc:
            raise _named_for_user(exc, name, staging) from None
        created_at = time.time()
        meta = {
            "name": str(name),
            "created_at": created_at,
            "n_images": int(len(image_set.labels)),
            "classes": image_set.class_counts(),
            "skipped": [list(item) for item in image_set.skipped],
        }
        (dataset_dir / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        target = _claim(dataset_dir, slugify(name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return UploadInfo(
        name=str(name),
        slug=target.name,
        path=target,
        created_at=created_at,
        n_images=meta["n_images"],
        classes=meta["classes"],
        skipped=[tuple(item) for item in meta["skipped"]],
    )


def _claim(source: Path, slug: str) -> Path:
    """Rename `source` to the first free `slug`, `slug-2`, ...; atomic, so racing uploads never
    share a folder (renaming onto an existing non-empty folder fails)."""
    root = paths.uploads_dir()
    for counter in range(1, 10000):
        target = root / (slug if counter == 1 else f"{slug}-{counter}")
        if target.exists():
            continue
        try:
            os.rename(source, target)
            return target
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) or isinstance(exc, FileExistsError):
                continue  # another upload took it between the check and the rename
            raise
    raise data.DatasetError(f"too many uploads named {slug!r}; delete some first")


def _named_for_user(exc: data.DatasetError, name: str, staging: Path) -> data.DatasetError:
    """The same error, naming the user's upload instead of the staging copy it was checked in."""
    text = str(exc)
    for internal in (staging / "dataset", staging / "extracted", staging / "upload.zip", staging):
        text = text.replace(str(internal), repr(str(name)))
    text = text.replace("upload.zip", repr(str(name)))
    return data.DatasetError(text)


# ---------------------------------------------------------------------------------------- public API
def save_zip_upload(name: str, zip_bytes: bytes) -> UploadInfo:
    """Store a zip of an ImageFolder (`<class>/<images>`, optionally inside one wrapper folder).

    Raises `data.DatasetError` (nothing left on disk) for a file that is not a zip, an unsafe zip
    (absolute paths, "..", links) or a set that is not usable (one class, no images, ...)."""
    if not zipfile.is_zipfile(BytesIO(zip_bytes or b"")):
        raise data.DatasetError(f"{name!r} is not a zip file (expected a .zip of <class>/<images> folders)")
    staging = _new_staging()
    try:
        archive = staging / "upload.zip"
        archive.write_bytes(zip_bytes)
        extracted = data.extract_zip_safely(archive, staging / "extracted")
        archive.unlink()
        base = data.unwrap_wrapper_folders(extracted)
        dataset_dir = staging / "dataset"
        os.rename(base, dataset_dir)
    except data.DatasetError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise _named_for_user(exc, name, staging) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _finish(name, staging, dataset_dir)


def save_files_upload(name: str, files: list[tuple[str, bytes, str]]) -> UploadInfo:
    """Store loose files, each (filename, content, class_name). Filenames are reduced to their
    basename and de-duplicated within each class; class names are cleaned of path characters."""
    if not files:
        raise data.DatasetError("no files were uploaded")
    staging = _new_staging()
    try:
        dataset_dir = staging / "dataset"
        dataset_dir.mkdir()
        taken: dict[str, set[str]] = {}
        folders: dict[str, str] = {}  # casefolded class -> folder name (first spelling wins)
        for filename, content, class_name in files:
            clean = _safe_class_name(class_name)
            folder = folders.setdefault(clean.casefold(), clean)
            class_dir = dataset_dir / folder
            class_dir.mkdir(exist_ok=True)
            target = class_dir / _safe_filename(filename, taken.setdefault(folder, set()))
            with open(target, "xb") as handle:
                handle.write(bytes(content))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _finish(name, staging, dataset_dir)


def _read_info(folder: Path) -> UploadInfo | None:
    for meta_name in (META_FILE, LEGACY_META_FILE):
        meta_path = folder / meta_name
        if meta_path.is_file():
            break
    else:
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return UploadInfo(
            name=str(meta["name"]),
            slug=folder.name,
            path=folder,
            created_at=float(meta["created_at"]),
            n_images=int(meta["n_images"]),
            classes={str(k): int(v) for k, v in dict(meta["classes"]).items()},
            skipped=[(str(a), str(b)) for a, b in meta.get("skipped", [])],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_uploads() -> list[UploadInfo]:
    """Every stored upload, newest first; folders without readable metadata are ignored."""
    root = paths.uploads_dir()
    infos = []
    for child in root.iterdir():
        if child.name.startswith(".") or not child.is_dir() or child.is_symlink():
            continue
        info = _read_info(child)
        if info is not None:
            infos.append(info)
    return sorted(infos, key=lambda info: (info.created_at, info.slug), reverse=True)


def _upload_path(slug: str) -> Path:
    root = paths.uploads_dir()
    slug = str(slug)
    if (
        not slug
        or slug in (".", "..")
        or slug.startswith(".")
        or "/" in slug
        or "\\" in slug
        or "\0" in slug
        or os.sep in slug
        or (os.altsep and os.altsep in slug)
    ):
        raise ValueError(f"not an upload name: {slug!r}")
    path = root / slug
    if path.resolve().parent != root.resolve():
        raise ValueError(f"not an upload name: {slug!r}")
    return path


def delete_upload(slug: str) -> None:
    """Remove one upload. Refuses anything that is not a plain folder name inside uploads_dir
    (ValueError); a missing upload raises FileNotFoundError."""
    path = _upload_path(slug)
    if path.is_symlink() or not path.is_dir():
        raise FileNotFoundError(f"no upload named {slug!r}")
    # Rename first (atomic), then delete: no half-deleted set is ever visible to the loader.
    doomed = paths.uploads_dir() / f"{STAGING_PREFIX}deleted-{uuid.uuid4().hex}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def upload_spec(slug: str) -> str:
    """The dataset spec for `RunConfig.dataset`: the upload's folder path."""
    path = _upload_path(slug)
    if not path.is_dir():
        raise FileNotFoundError(f"no upload named {slug!r}")
    return str(path)
