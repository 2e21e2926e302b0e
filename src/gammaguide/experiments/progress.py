"""Progress bars (tqdm when it is installed and wanted, otherwise nothing)."""

from __future__ import annotations


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, desc: str, unit: str, enabled: bool):
    """A tqdm bar on stderr that disappears when done, or a stand-in that shows nothing."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=0.5, dynamic_ncols=True)
    return _NoBar()
