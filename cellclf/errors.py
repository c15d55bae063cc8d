"""Exceptions that say what went wrong and what to do next.

Every stage of the flow (slide → tissue → tiles → candidates → crops → classify → gate → write)
raises a subclass of :class:`CellclfError`; the CLI prints its message without a traceback and
exits non-zero. Messages name the file or input at fault and how to fix it.
"""

from __future__ import annotations


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
