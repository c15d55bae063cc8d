"""Exceptions that say what went wrong and what to do next.

Every stage of the flow (slide → tissue → tiles → candidates → crops → classify → gate → write)
raises a subclass of :class:`CellclfError`; the CLI prints its message without a traceback and
exits non-zero. Messages name the file or input at fault and how to fix it.
"""

from __future__ import annotations

import errno


class CellclfError(Exception):
    """Base class: the message is shown to the user as is (no traceback)."""


class SlideOpenError(CellclfError):
    """A slide file is missing, truncated, or in a format OpenSlide cannot read."""


class MissingMppError(CellclfError):
    """The slide does not state its pixel size and none was given with --mpp."""


class EmptyTissueError(CellclfError):
    """No tissue was found on the slide (blank glass or a threshold problem)."""


class AnnotationError(CellclfError):
    """An annotation file (GeoJSON, CSV, manifest) is malformed."""


class ModelMismatchError(CellclfError):
    """A model bundle does not fit a slide or dataset (mpp, stain, classes)."""


class ConfigError(CellclfError):
    """A configuration file or override is invalid."""


class BundleError(CellclfError):
    """A model bundle is missing files or its card is invalid."""


class OptionError(CellclfError):
    """A command-line option has a value the command cannot use (out of range, unknown name)."""


_OS_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "it already exists",
    errno.ENAMETOOLONG: "the name is too long",
}


def os_error_message(exc: OSError) -> str:
    """An operating-system error as one sentence naming the path and what to do."""
    path = exc.filename if exc.filename is not None else "a file"
    reason = _OS_REASONS.get(exc.errno or 0, exc.strerror or str(exc))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        action = ("free some space (or choose an output folder on another disk) and run the same "
                  "command again; files are replaced atomically, so nothing half-written was kept")
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        action = "choose a path you may write to (e.g. under your home folder) or fix its permissions"
    elif exc.errno == errno.EISDIR:
        action = "give a file name, not a folder"
    elif exc.errno in (errno.ENOENT, errno.ENOTDIR):
        action = "check the path"
    else:
        action = "check the path and the disk"
    return f"cannot use {path}: {reason}; {action}"


def user_message(exc: BaseException) -> str:
    """What the CLI prints for an error: a CellclfError's own text, an OS error with its path, or
    (for anything else, a bug) its type and text with how to get the details."""
    if isinstance(exc, CellclfError):
        return str(exc)
    if isinstance(exc, OSError):
        return os_error_message(exc)
    return (f"unexpected error ({type(exc).__name__}: {exc}). This is a bug in cellclf: rerun "
            "with CELLCLF_DEBUG=1 to see the traceback and report it")


def print_error(message: str) -> None:
    """Print ``error: MESSAGE`` to stderr; brackets in the message are printed as they are (rich
    markup in values such as ``[nan, 1.0]`` is escaped, never interpreted)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}",
                                               highlight=False)
