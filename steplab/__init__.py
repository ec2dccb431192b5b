"""steplab: predict before you train."""

__version__ = "0.1.0"
