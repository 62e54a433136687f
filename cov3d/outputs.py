"""Guards for what cov3d writes: never over its own inputs, a run it did not start, or a file that
is not its own earlier output of the same kind.

Every command checks its outputs here before opening anything for writing: outputs inside an input or
a run folder being read are refused (``refuse_inside``); an existing output is replaced only when it is
provably cov3d's own (its exact CSV header, ``FIGURE_MARKER`` in a figure's metadata, or the SHA-256 in
an output folder's ``MANIFEST_FILE``), with a one-line notice on standard error; anything else needs
``--overwrite`` (docs/safety.md).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from cov3d.errors import Cov3dError
from cov3d.runfiles import is_run_dir, run_file_names

FIGURE_MARKER = "cov3d figure"
"""The ``Creator`` metadata of every figure cov3d saves (``figure_metadata``)."""
MARKED_FORMATS = ("png", "pdf", "svg", "eps", "ps")
"""Image formats whose metadata can carry the marker (matplotlib writes no metadata for the others)."""
MANIFEST_FILE = ".cov3d-outputs.json"
"""Record of the files cov3d wrote into an output folder: ``{"files": {name: sha256}}``."""
HEADER_BYTES = 64 * 1024
"""Most bytes read to find a CSV header or a figure's marker at the start of a file."""
MAX_MARKED_BYTES = 64 * 2**20
"""Larger files are never taken for a cov3d figure (a PDF's marker is at its end)."""
HASH_CHUNK_BYTES = 2**20


def notice(message: str) -> None:
    """A one-line notice on standard error."""
    print(message, file=sys.stderr, flush=True)


def real(path: Path) -> Path:
    """``path`` absolute, with every link followed (also for paths that do not exist yet)."""
    return Path(os.path.realpath(path))


def refuse_inside(output: Path, inputs: Iterable[Path], what: str = "output") -> None:
    """``Cov3dError`` if ``output`` is one of ``inputs`` or lies inside one of them (scan folders,
    scan files, run folders or model files being read). No option lifts this."""
    target = real(output)
    for source in inputs:
        source = real(source)
        if target == source or target.is_relative_to(source):
            kind = "folder" if source.is_dir() else "file"
            raise Cov3dError(
                f"The {what} {output} would be written {'over' if target == source else 'inside'} the input "
                f"{kind} {source}, which this command reads: choose a path outside it."
            )


def refuse_run_file(output: Path) -> None:
    """``Cov3dError`` if ``output`` is one of a run's files inside a run folder."""
    target = real(output)
    if target.name in run_file_names() and is_run_dir(target.parent):
        raise Cov3dError(
            f"{output} is a file of the cov3d run {target.parent}; writing it would break the run: choose another path."
        )


def check_output(
    output: Path, *, kind: str, is_own: Callable[[Path], bool], overwrite: bool, inputs: Iterable[Path] = (),
    option: str = "--output", announce: bool = True,
) -> bool:
    """Refuse ``output`` (a file about to be written) unless it is new, cov3d's own earlier output
    of ``kind`` (``is_own``), or ``overwrite`` is given; a notice says what is replaced (unless
    ``announce`` is off). Returns whether an existing file will be replaced."""
    output = Path(output)
    refuse_inside(output, inputs)
    refuse_run_file(output)
    if not os.path.lexists(output):
        return False
    if output.is_dir():
        raise Cov3dError(f"{output} is a folder: give a file name for the {kind} ({option}).")
    if is_own(output):
        if announce:
            notice(f"Replacing earlier {kind} {output}")
    elif overwrite:
        if announce:
            notice(f"Replacing {output} (--overwrite)")
    else:
        raise Cov3dError(
            f"{output} exists and is not an earlier {kind} of cov3d: give another {option}, or --overwrite to replace it."
        )
    return True


# Predictions CSV ---------------------------------------------------------------------------


def csv_header(path: Path) -> tuple[str, ...] | None:
    """The first row of a CSV file (read from its first ``HEADER_BYTES`` only), or ``None`` if it
    has no complete first line or is not UTF-8 text."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(HEADER_BYTES)
    except OSError:
        return None
    line, newline, _ = start.partition(b"\n")
    if not newline:
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    rows = list(csv.reader(io.StringIO(text)))
    return tuple(rows[0]) if rows else None


def has_header(path: Path, headers: Sequence[Sequence[str]]) -> bool:
    """Whether the file's first row is exactly one of ``headers``."""
    header = csv_header(path)
    return header is not None and any(header == tuple(candidate) for candidate in headers)


# Figures -----------------------------------------------------------------------------------


def figure_metadata(image_format: str) -> dict[str, str] | None:
    """The ``savefig`` metadata that marks a figure as cov3d's (``None`` where the format has none)."""
    return {"Creator": FIGURE_MARKER} if image_format in MARKED_FORMATS else None


def _png_marked(data: bytes) -> bool:
    """A PNG whose ``Creator`` text chunk (before the image data) is the marker."""
    signature = b"\x89PNG\r\n\x1a\n"
    if not data.startswith(signature):
        return False
    position = len(signature)
    while position + 8 <= len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        chunk_type = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        if chunk_type == b"tEXt" and body == b"Creator\x00" + FIGURE_MARKER.encode("latin-1"):
            return True
        if chunk_type in (b"IDAT", b"IEND"):
            return False
        position += 12 + length
    return False


def _pdf_marked(path: Path) -> bool:
    """A PDF whose trailer's Info dictionary has the marker as ``/Creator``."""
    data = path.read_bytes()
    if not data.startswith(b"%PDF-"):
        return False
    trailer = re.findall(rb"trailer\s*<<(.*?)>>", data[-4096:], re.DOTALL)
    info = re.search(rb"/Info\s+(\d+)\s+0\s+R", trailer[-1]) if trailer else None
    if info is None:
        return False
    found = re.search(rb"(?:^|[\r\n])" + info.group(1) + rb"\s+0\s+obj\s*<<(.*?)>>\s*endobj", data, re.DOTALL)
    return found is not None and re.search(rb"/Creator\s*\(" + re.escape(FIGURE_MARKER.encode()) + rb"\)", found.group(1)) is not None


def has_figure_marker(path: Path) -> bool:
    """Whether ``path`` is a figure that cov3d saved (see the module docstring)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > MAX_MARKED_BYTES:
            return False
        with open(path, "rb") as handle:
            start = handle.read(HEADER_BYTES)
        if start.startswith(b"\x89PNG"):
            return _png_marked(start)
        if start.startswith(b"%PDF-"):
            return _pdf_marked(path)
        if start.startswith(b"%!PS"):
            return re.search(rb"^%%Creator: " + re.escape(FIGURE_MARKER.encode()) + rb"\r?$", start, re.MULTILINE) is not None
        text = start.decode("utf-8", errors="replace")
        if "<svg" in text:
            pattern = r"<dc:creator>\s*<cc:Agent>\s*<dc:title>" + re.escape(FIGURE_MARKER) + r"</dc:title>"
            return re.search(pattern, text) is not None
    except OSError:
        return False
    return False


def check_figure(output: Path, *, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """``check_output`` for a figure."""
    check_output(output, kind="figure", is_own=has_figure_marker, overwrite=overwrite, inputs=inputs)


# Output folders ----------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    """The recorded digests of an output folder (empty if there is no readable manifest)."""
    try:
        files = json.loads((Path(folder) / MANIFEST_FILE).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(name): str(digest) for name, digest in files.items()} if isinstance(files, dict) else {}


class OutputFolder:
    """A folder that a command writes named files into (stats tables, Grad-CAM maps, submission
    files). ``claim`` checks the files before anything is written; ``record`` notes what was
    written in the folder's manifest, which is what makes them provably cov3d's next time."""

    def __init__(self, folder: Path, *, kind: str, overwrite: bool, inputs: Iterable[Path] = (), option: str = "--output"):
        self.folder, self.kind, self.overwrite, self.option = Path(folder), kind, overwrite, option
        self.inputs = list(inputs)
        refuse_inside(self.folder, self.inputs, "output folder")
        if os.path.lexists(self.folder) and not self.folder.is_dir():
            raise Cov3dError(f"{self.folder} exists and is not a folder: give a folder for the {kind} ({option}).")

    def is_own(self, path: Path) -> bool:
        """Whether ``path`` (in this folder) is unchanged since cov3d wrote it, or a marked figure."""
        recorded = _manifest(self.folder).get(path.name)
        try:
            if recorded is not None and path.is_file() and file_digest(path) == recorded:
                return True
        except OSError:
            return False
        return has_figure_marker(path)

    def claim(self, names: Iterable[str]) -> None:
        """Refuse (one ``Cov3dError`` naming the first file) unless every existing file among
        ``names`` may be replaced; say which are replaced."""
        replaced = [
            name for name in names
            if check_output(self.folder / name, kind=self.kind, is_own=self.is_own, overwrite=self.overwrite,
                            inputs=self.inputs, option=self.option, announce=False)
        ]
        if replaced:
            how = " (--overwrite)" if self.overwrite else ""
            notice(f"Replacing earlier {self.kind}s in {self.folder}{how}: {', '.join(replaced)}")

    def record(self, paths: Iterable[Path]) -> None:
        """Record the digests of the files just written."""
        from cov3d.atomic import write_text_atomically

        files = _manifest(self.folder)
        files.update({Path(path).name: file_digest(Path(path)) for path in paths})
        write_text_atomically(self.folder / MANIFEST_FILE, json.dumps({"files": files}, indent=1, sort_keys=True),
                              f"Free some space or choose another {self.option}.")


# Scan names in submission files ------------------------------------------------------------

SUBMISSION_NAME_SEPARATORS = ",;\"/\\"
"""Characters a scan name in a submission file must not hold: field and path separators, quotes."""


def submission_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be written as one line of a submission file, or ``None`` if it can:
    empty, or holding a line break, another control character or a separator."""
    if not name.strip():
        return "it is empty"
    for character in name:
        if unicodedata.category(character) in ("Cc", "Cf", "Zl", "Zp"):
            return f"it holds the control character {character!r}"
        if character in SUBMISSION_NAME_SEPARATORS:
            return f"it holds the separator {character!r}"
    return None
