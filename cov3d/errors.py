"""Errors that the command line shows to the user as a single line."""


class Cov3dError(Exception):
    """A user-facing error: its message is shown as one line.

    The message is kept apart from ``args``, which fastai rewrites ("Exception occured in
    `Callback` when calling event ...") when an error passes through a training callback.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def one_line(text: object) -> str:
    """``str(text)`` with all whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())
