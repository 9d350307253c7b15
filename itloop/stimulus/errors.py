"""The errors the stimulus library raises; messages name the offending value."""

from __future__ import annotations

__all__ = ["AttackError", "StimulusError"]


class StimulusError(Exception):
    """Base class of the stimulus library's errors."""


class AttackError(StimulusError):
    """An attack or control broke its budget or its box: a bug, never silently tolerated."""
