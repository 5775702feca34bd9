"""The one version of the ``ipcv`` distribution (``ipcv_core``, ``ipcv_compile``, ``ipcv_adapters`` and
``ipcv`` re-export it): read from the installed package's metadata (``pyproject.toml``'s
``[project] version``), so there is no second copy to keep in step."""

from __future__ import annotations

__all__ = ["__version__"]


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("ipcv")
        except PackageNotFoundError:  # a source checkout on sys.path, not installed
            return "0+unknown"
    except ImportError:  # pragma: no cover
        return "0+unknown"


__version__ = _version()
