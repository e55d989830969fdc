"""Test-wide settings: every notebook and stage runs at the `smoke` preset under pytest."""

import os

os.environ["WM_PRESET"] = "smoke"
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items):
    """Every notebook that nbmake runs is marked `notebook` (markers are registered in pyproject.toml),
    so `-m "not notebook"` leaves the lessons out of a quick unit run."""
    import pytest

    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.notebook)
