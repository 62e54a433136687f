"""Errors that the command line shows to the user as a single line."""


class Cov3dError(Exception):
    """A user-facing error: its message is shown as one line."""
