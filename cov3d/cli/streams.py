"""The command line's standard output and error, made safe for pipes and plain consoles.

- A reader that goes away (``cov3d stats DATA -o out | head -1``) must not stop a command before it
  has written its files: once a stream's pipe is closed, the rest of what goes to it is discarded
  (its descriptor is pointed at the null device) and the command carries on.
- A console that cannot show every character (``PYTHONIOENCODING=ascii``, an old code page) gets
  the project's few non-ASCII characters spelt in ASCII (``ASCII_SPELLINGS``), any other as ``?``.
"""

from __future__ import annotations

import codecs
import io
import os
import sys

ASCII_SPELLINGS = {"–": "-", "—": "-", "−": "-", "×": "x", "…": "...", "²": "^2", "³": "^3", "·": ".", "≥": ">=",
                   "≤": "<=", "√": "sqrt", "λ": "lambda", "β": "beta", "ε": "epsilon", "✓": "ok", "§": "section "}
"""What the command line prints instead of each non-ASCII character it uses, where the console lacks it."""
UNENCODABLE = "?"
"""What it prints instead of any other character the console lacks."""
ENCODING_ERRORS = "cov3d-spell"
"""The name of the codec error handler that spells characters by ``ASCII_SPELLINGS``."""


def spell_unencodable(error: UnicodeError) -> tuple[str, int]:
    """Codec error handler: the characters that the console's encoding lacks, spelt by ``ASCII_SPELLINGS``."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    lacking = error.object[error.start:error.end]
    return "".join(ASCII_SPELLINGS.get(character, UNENCODABLE) for character in lacking), error.end


codecs.register_error(ENCODING_ERRORS, spell_unencodable)


class ClosablePipe(io.BufferedWriter):
    """The bytes of a standard stream: after the reader has closed the pipe (``BrokenPipeError``), the
    descriptor is pointed at the null device, so that this and every later write succeeds unseen."""

    def write(self, data) -> int:
        try:
            return super().write(data)
        except BrokenPipeError:
            self._discard_output()
            return len(data)

    def flush(self) -> None:
        try:
            super().flush()
        except BrokenPipeError:
            self._discard_output()
            super().flush()

    def _discard_output(self) -> None:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self.raw.fileno())
        finally:
            os.close(null)


def guard_console_streams() -> None:
    """Replace the process's own ``sys.stdout`` and ``sys.stderr`` (not a test runner's capture) with
    streams over the same descriptors that survive a closed pipe and spell what the console cannot show
    (on Windows, where a console is no plain descriptor, the streams only learn the spelling)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or stream is not getattr(sys, f"__{name}__") or not hasattr(stream, "buffer"):
            continue
        try:
            descriptor = stream.fileno()
            stream.flush()
        except (OSError, ValueError):
            continue
        if sys.platform == "win32":  # a Windows console stream is not a plain descriptor: only spell what it lacks
            stream.reconfigure(errors=ENCODING_ERRORS)
            continue
        pipe = ClosablePipe(io.FileIO(descriptor, "w", closefd=False))
        setattr(sys, name, io.TextIOWrapper(pipe, encoding=stream.encoding, errors=ENCODING_ERRORS,
                                            line_buffering=stream.line_buffering))
