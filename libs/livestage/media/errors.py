"""The one error type of media input: a `ValueError` with a one-line message naming the file."""


class MediaError(ValueError):
    """An input file is missing, unreadable, of the wrong kind, rate or shape."""
