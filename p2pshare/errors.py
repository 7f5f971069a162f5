"""The exception tree.

Each class's docstring is the message a user sees when nothing more specific
was given; :func:`describe` is the one place that turns an exception into it.
"""

from __future__ import annotations


class P2PError(Exception):
    """p2pshare failed."""

    def __str__(self) -> str:
        detail = super().__str__()
        return detail or (self.__doc__ or "").strip()


class MalformedMessage(P2PError):
    """A message from the network could not be decoded."""


class UnsupportedVersion(MalformedMessage):
    """A message from the network carries a protocol version this peer does not speak."""


class MessageTooLarge(MalformedMessage):
    """A message from the network exceeds the protocol's size limit."""


class InvalidName(P2PError):
    """The file name is not acceptable (empty, absolute, '..', control characters or too long)."""


class NotFound(P2PError):
    """No peer answered with the file."""


class AmbiguousName(P2PError):
    """Holders answered with different files of that name; choose one by its SHA-256."""


class AlreadyExists(P2PError):
    """A file of that name already exists in the shared folder."""


class PlaceFailed(P2PError):
    """The verified download could not be moved into the shared folder."""


class TransferFailed(P2PError):
    """The transfer failed before the file was complete."""


class VerificationFailed(TransferFailed):
    """The received file does not match the size or SHA-256 the holder announced."""


class TrackerError(P2PError):
    """The tracker refused the request (``code``, its error) or could not be reached (no code)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class ControlError(P2PError):
    """The peer's control API could not be reached or refused the request."""


def describe(error: BaseException) -> str:
    """One line for a user: the message, never a traceback."""
    if isinstance(error, P2PError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    return f"{type(error).__name__}: {error}"
