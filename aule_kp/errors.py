"""Exceptions of the public API."""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """A forced backend cannot take the problem; ``reasons`` lists every reason."""

    def __init__(self, backend: str, reasons: list[str]):
        self.backend = backend
        self.reasons = list(reasons)
        super().__init__(f"backend {backend!r} cannot run this problem: " + "; ".join(self.reasons))
