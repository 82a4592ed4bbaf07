"""Clean natural sources from data-only packages (Debian / PyPI, fetched by :mod:`datprl.platform.data.packages`)."""

from __future__ import annotations

from datprl.platform.data.sources import MissingSource, SourceImage


def sources() -> list[SourceImage | MissingSource]:
    """This domain's data-package sources, available or missing (with the reason)."""
    return []
