"""Test-wide settings: every notebook and stage runs at the `smoke` preset under pytest."""

import os

os.environ["WM_PRESET"] = "smoke"
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("MPLBACKEND", "Agg")
