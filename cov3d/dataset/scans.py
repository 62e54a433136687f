"""Finding CT scans on disk, ordering their slices and reading slices as 8-bit greyscale.

A scan is a folder of slice files named ``<integer>.jpg`` (COV19-CT-DB layout), ordered by the
integer (``10.jpg`` after ``9.jpg``; two files of one number, ``05.jpg`` and ``5.jpg``, are refused);
every other file in the folder (``._3.jpg``, ``.DS_Store``,
``notes.txt``, ``3a.jpg``) is ignored. ``read_slice`` reads any slice as 8-bit grey; ``find_scans``
also finds DICOM series folders and NIfTI files, which ``cov3d.dataset.dicom_nifti`` reads.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cov3d.dataset.filekinds import LINK_LOOP, entry_is_dir, entry_is_file, special_file
from cov3d.errors import Cov3dError, one_line
from cov3d.runfiles import CONFIG_FILE

logger = logging.getLogger(__name__)

SLICE_NAME = re.compile(r"^(\d+)\.jpe?g$", re.IGNORECASE)
"""Slice file names: ``<integer>.jpg`` (COV19-CT-DB); ``.jpeg`` and upper case are accepted too."""

NO_SCAN_NUMBER = sys.maxsize
"""``scan_number`` of a name without digits: such scans sort after all numbered ones."""

MAX_16BIT = 65535
"""Maximum of an unsigned 16-bit pixel; 16-bit slices are scaled by 255 / MAX_16BIT."""

MAX_8BIT = 255
"""Maximum of an 8-bit pixel."""

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""PIL modes holding 16-bit (or wider integer) grey values."""

UNSUPPORTED_MODES = {"F": "32-bit float"}
"""PIL modes that ``read_slice`` refuses (converting them to 8 bits would clip, e.g. to all black)."""

READ_HINT = "Replace or delete the file (or leave the scan out) and run again."
"""What to do about an unreadable slice."""

NIFTI_SUFFIXES = (".nii.gz", ".nii")
"""File names of NIfTI-1/2 volumes, compressed or not."""

DICOM_SUFFIX = ".dcm"
DICOM_MAGIC_OFFSET, DICOM_MAGIC = 128, b"DICM"
"""DICOM Part 10 files: a 128-byte preamble followed by ``DICM``."""

DICOM_PROBE_FILES = 4
"""Files of a folder looked at when deciding whether it is a DICOM series."""

READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
"""What PIL raises for unreadable, truncated or corrupt image files."""


def scan_number(name: str) -> int:
    """The last integer in a scan folder name: ``'ct_scan_12' -> 12``, ``'ct_scan7' -> 7``,
    ``'test_ct_scan_3' -> 3``; ``NO_SCAN_NUMBER`` if the name holds no digits."""
    numbers = re.findall(r"\d+", name)
    return int(numbers[-1]) if numbers else NO_SCAN_NUMBER


def _slice_index(name: str) -> int | None:
    """The slice number of a file name ``<integer>.jpg``, or ``None`` for any other name."""
    match = SLICE_NAME.match(name)
    return int(match.group(1)) if match else None


def _entries(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder``; ``Cov3dError`` if it is missing, not a folder or unreadable."""
    try:
        with os.scandir(folder) as iterator:
            return list(iterator)
    except FileNotFoundError:
        raise Cov3dError(f"Scan folder {folder} does not exist: check the path.") from None
    except NotADirectoryError:
        raise Cov3dError(f"{folder} is not a folder: give a folder of <integer>.jpg slices.") from None
    except OSError as error:
        raise Cov3dError(
            f"Cannot read folder {folder}: {one_line(error.strerror or error)}. "
            "Fix its permissions or leave it out."
        ) from None


def duplicate_slice_numbers(names: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs of slice file names with the same slice number (``05.jpg`` and ``5.jpg``, ``5.jpg``
    and ``5.JPG``), each file after the first of its number paired with that first, in name order."""
    first: dict[int, str] = {}
    pairs = []
    for name in sorted(names):
        index = _slice_index(name)
        if index is not None:
            if index in first:
                pairs.append((first[index], name))
            else:
                first[index] = name
    return pairs


def duplicate_slices_message(scan_dir: Path, pairs: Sequence[tuple[str, str]]) -> str:
    """One line naming the first pair of files that share a slice number, and how many pairs there are."""
    (one, other), more = pairs[0], len(pairs) - 1
    also = f" (and {more} more pair{'s' if more > 1 else ''})" if more else ""
    return (f"{scan_dir / one} and {scan_dir / other} have the same slice number {_slice_index(one)}{also}: "
            "the slice order is ambiguous. Remove or renumber one of each pair.")


def _no_slices_message(folder: Path) -> str:
    """Why ``folder`` is no scan: a cov3d run folder, a folder of scans, or a folder without slices."""
    if (folder / CONFIG_FILE).is_file():
        return f"{folder} is a cov3d run folder, not a scan: check the path."
    inner = sorted((scan for scan in _search(folder, set()) if scan != folder), key=_scan_sort_key)
    if inner:
        return (f"{folder} is not one scan but a folder of {len(inner)} scan{'s' if len(inner) > 1 else ''} "
                f"(such as {inner[0]}): give one of them.")
    return f"No CT slices (<integer>.jpg files) in {folder}: check the path or remove the folder."


def list_slices(scan_dir: Path) -> list[Path]:
    """The slice files ``<integer>.jpg`` of a scan in numeric order.

    Entries that are folders are skipped; anything else with a slice name is kept, so that a
    broken link or unreadable file is reported when it is read rather than silently dropped.
    Raises ``Cov3dError`` if the folder is missing, unreadable or holds no slices, or if two
    files have the same slice number (``duplicate_slice_numbers``).
    """
    scan_dir = Path(scan_dir)
    slices = []
    for entry in _entries(scan_dir):
        index = _slice_index(entry.name)
        if index is not None and not entry_is_dir(entry):
            slices.append((index, entry.name))
    if not slices:
        raise Cov3dError(_no_slices_message(scan_dir))
    duplicates = duplicate_slice_numbers([name for _, name in slices])
    if duplicates:
        raise Cov3dError(duplicate_slices_message(scan_dir, duplicates))
    return [scan_dir / name for _, name in sorted(slices)]


def _to_grey8(image: Image.Image) -> Image.Image:
    """An image in mode ``"L"`` (8-bit grey); see the module docstring for the conversions."""
    if image.mode == "L":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        scaled = np.rint(np.clip(values, 0, MAX_16BIT) * (MAX_8BIT / MAX_16BIT))
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    return image.convert("L")


def read_slice(path: Path, *, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Read one slice as a loaded 8-bit grey PIL image (mode ``"L"``, values 0..255), whatever the
    file holds (Pillow opens files by content: a ``.jpg`` may hold PNG or TIFF data):

    - 8-bit grey: unchanged;
    - RGB, palette, CMYK, with or without alpha: PIL's ``convert("L")``, the ITU-R 601-2 luma
      ``L = 0.299 R + 0.587 G + 0.114 B`` (alpha is dropped);
    - 16-bit (``"I;16*"``) and 32-bit integer (``"I"``, Pillow's mode for 16-bit PNG/TIFF data):
      clipped to 0..65535, scaled by 255 / 65535 and rounded;
    - 32-bit float (``"F"``, e.g. a TIFF of HU or of values in [0, 1]): refused with its reason, since
      no fixed mapping to grey levels fits every such file (``UNSUPPORTED_MODES``).

    ``draft_size`` ``(width, height)`` asks the JPEG decoder for DCT-domain downscaling
    (``Image.draft``): the image comes back at the smallest power-of-two reduction (1/2, 1/4,
    1/8) that is still at least that large, or at full size. It is ignored for non-JPEG data.
    Raises ``Cov3dError`` naming the file if it is empty, corrupt or unreadable.
    """
    path = Path(path)
    kind = special_file(path)
    if kind is not None:
        raise Cov3dError(f"Cannot read CT slice {path}: it is {kind}, not a regular file. {READ_HINT}")
    try:
        image = Image.open(path)
        try:
            if image.mode in UNSUPPORTED_MODES:
                raise Cov3dError(
                    f"Cannot read CT slice {path}: unsupported image mode {image.mode} ({UNSUPPORTED_MODES[image.mode]}); "
                    "save the slices as 8- or 16-bit grey images."
                )
            if draft_size is not None and image.format == "JPEG":
                image.draft("L", draft_size)
            image.load()
            grey = _to_grey8(image)
        except BaseException:
            image.close()
            raise
    except READ_ERRORS as error:
        raise Cov3dError(f"Cannot read CT slice {path}: {_read_failure(path, error)}. {READ_HINT}") from None
    if grey is image and image.format != "JPEG":
        grey = image.copy()  # other formats (multi-frame TIFF, MPO) may keep the file open
    if grey is not image:
        image.close()
    return grey


def _read_failure(path: Path, error: BaseException) -> str:
    """A one-line reason why ``path`` could not be read as an image."""
    try:
        if os.stat(path).st_size == 0:
            return "the file is empty (0 bytes)"
    except OSError:
        pass
    return one_line(getattr(error, "strerror", None) or error) or type(error).__name__


def is_jpeg_scan_dir(path: Path) -> bool:
    """Whether ``path`` is a readable folder holding at least one ``<integer>.jpg`` entry."""
    try:
        with os.scandir(path) as iterator:
            return any(_slice_index(entry.name) is not None for entry in iterator)
    except OSError:
        return False


def is_nifti_file(path: Path) -> bool:
    """Whether ``path`` is a file named like a NIfTI volume (``.nii`` or ``.nii.gz``)."""
    path = Path(path)
    return path.name.lower().endswith(NIFTI_SUFFIXES) and not path.name.startswith(".") and path.is_file()


def scan_name(path: Path) -> str:
    """The scan's name for CSVs and submissions: a folder's name, or a NIfTI file's without suffix."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def looks_dicom(path: Path) -> bool:
    """``.dcm`` name, or the ``DICM`` marker of a DICOM Part 10 file."""
    if path.suffix.lower() == DICOM_SUFFIX:
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(DICOM_MAGIC_OFFSET)
            return handle.read(len(DICOM_MAGIC)) == DICOM_MAGIC
    except OSError:
        return False


def visible_files(folder: Path) -> list[Path]:
    """Visible regular files of ``folder``, sorted by name; empty if it cannot be read."""
    try:
        with os.scandir(folder) as entries:
            return sorted(Path(e.path) for e in entries if entry_is_file(e) and not e.name.startswith("."))
    except OSError:
        return []


def is_dicom_dir(path: Path) -> bool:
    """Whether ``path`` is a folder whose first files (by name) include a DICOM file."""
    return any(looks_dicom(file) for file in visible_files(Path(path))[:DICOM_PROBE_FILES])


def is_scan(path: Path) -> bool:
    """Whether ``path`` is a JPEG scan folder, a DICOM series folder or a NIfTI file."""
    if is_nifti_file(path):
        return True
    return Path(path).is_dir() and (is_jpeg_scan_dir(path) or is_dicom_dir(path))


def _scan_sort_key(path: Path) -> tuple[str, int, str]:
    """Order scans by (parent folder, number in the name, name)."""
    return (str(path.parent), scan_number(path.name), path.name)


def _search(root: Path, visited: set[Path]) -> list[Path]:
    """Scans (see ``is_scan``) at or below ``root``; scan folders are not searched further.

    Links to folders are followed; ``visited`` (resolved paths) stops link loops.
    """
    if is_scan(root):
        return [root]
    visited.add(root.resolve())
    found = []
    for entry in _entries(root):
        child = Path(entry.path)
        if not entry.name.startswith(".") and special_file(child) == LINK_LOOP:
            logger.warning("Skipping %s: it is %s.", child, LINK_LOOP)
        elif entry_is_dir(entry) and not entry.name.startswith(".") and child.resolve() not in visited:
            found.extend(_search(child, visited))
        elif is_nifti_file(child):
            found.append(child)
    return found


def find_scans(paths: Sequence[Path]) -> list[Path]:
    """Scans (JPEG folders, DICOM series folders, NIfTI files) given directly or found
    recursively below the given folders.

    Hidden folders are not searched. Returns the scans sorted by (parent, ``scan_number``, name),
    each once. Raises ``Cov3dError`` if a path is missing, a folder cannot be read, or no scan
    is found at all.
    """
    scans: dict[Path, Path] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise Cov3dError(f"{path} does not exist: give a scan folder or a folder of scan folders.")
        if not path.is_dir() and not is_nifti_file(path):
            raise Cov3dError(f"{path} is not a folder or a NIfTI file: give a scan folder or a folder of scan folders.")
        for scan in _search(path, set()):
            scans.setdefault(scan.resolve(), scan)
    if not scans:
        given = ", ".join(str(path) for path in paths) or "(no paths given)"
        raise Cov3dError(
            f"No scan folders (of <integer>.jpg slices or a DICOM series) or NIfTI files found in {given}: "
            "check the paths."
        )
    return sorted(scans.values(), key=_scan_sort_key)
