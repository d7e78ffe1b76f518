"""aule-kp's version: a leaf module, so that modules inside the package can read it without
importing the package (whose ``__init__`` imports them)."""

__version__ = "0.1.0"
