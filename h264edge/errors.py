# -*- test-case-name: tests -*-
"""Exceptions shared by layers; each maps to one HTTP status in the web layer."""


class EdgeError(Exception):
    """Base class of errors that the web layer turns into a short plain-text answer."""


class OriginUnavailable(EdgeError):
    """No origin answered usably (connect failure, timeout, 5xx) and nothing cached can stand in."""

    def __init__(self, message: str, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class OriginStatus(EdgeError):
    """
    A slice fetch for a stored object got a 4xx (404, 403, ...): the object is gone at the origin, it
    is dropped, and an answer that has not started yet gets that status (stored 4xx answers are
    relayed with their own block instead, see L{h264edge.web.resource.EdgeResource}).
    """

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or f"origin answered {code}")
        self.code = code


class ObjectChanged(EdgeError):
    """The origin's validators changed while we were filling: the cached bytes can no longer be trusted."""
