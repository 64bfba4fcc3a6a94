"""The library's error for bad configuration: raised before any actor starts, naming the value and the fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is out of range, of the wrong type, or unknown."""
