"""`wm figures`: the lessons' key figures rendered from the shipped artifacts, and embedded in the lessons."""

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from test_cli import last_json, wm
from wmlib import figures
from wmlib.config import PRETRAINED_DIR, PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs" / "figures"
EMBED = re.compile(r"!\[[^\]]*\]\(((?:\.\./)+docs/figures/[^)]+)\)")


def embedded(notebook: Path) -> list[Path]:
    """The figure files a notebook's markdown cells embed, resolved from the notebook's folder."""
    cells = json.loads(notebook.read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return [(notebook.parent / link).resolve() for link in EMBED.findall(text)]


@pytest.mark.slow  # more than 10 s on 2 cores: left out of the quick unit run
def test_wm_figures_renders_every_figure_from_the_shipped_artifacts(tmp_path):
    out = last_json(wm("figures", "--out", tmp_path))
    assert out["figures"] == list(figures.FIGURES)
    for name in figures.FIGURES:
        image = cv2.imread(str(tmp_path / name))
        assert image is not None, f"{name} is not a readable PNG"
        assert image.shape[0] > 100 and image.shape[1] > 200 and image.std() > 10, f"{name} looks empty"
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_every_lesson_embeds_its_shipped_figures():
    lessons = sorted((PROJECT_ROOT / "notebooks").glob("0*.ipynb"))
    links = {path for nb in lessons for path in embedded(nb)}
    assert links == {(DOCS / name).resolve() for name in figures.FIGURES}
    for nb in lessons:  # each lesson shows the figures named after it
        prefix = nb.name[:2]
        assert {p.name for p in embedded(nb)} == {n for n in figures.FIGURES if n.startswith(prefix)}, nb.name
    missing = [name for name in figures.FIGURES if not (DOCS / name).is_file()]
    assert not missing, f"run `wm figures` to render {missing} into {DOCS}"


def test_figures_bad_agent_folder_names_the_missing_file(tmp_path):
    agent = tmp_path / "agent"
    shutil.copytree(PRETRAINED_DIR, agent, ignore=shutil.ignore_patterns("eval.json"))
    proc = wm("figures", "--agent", agent, "--out", tmp_path / "figs", check=False)
    assert proc.returncode != 0
    assert str(agent / "eval.json") in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "figs").exists()


def test_picture_keeps_the_aspect_ratio_and_save_writes_a_png(tmp_path):
    image = np.zeros((64, 256, 3), np.uint8)
    image[:, 128:] = 255
    path = figures.save(figures.picture(image, width=8.0), tmp_path / "p.png", dpi=50)
    saved = cv2.imread(str(path))
    assert saved.shape[:2] == (100, 400)  # 8 x 2 inches at 50 dpi: the image's 4:1 ratio
    assert saved.max() == 255 and saved.min() == 0


def test_sweep_table_draws_dream_and_pooled_real_bars_and_each_run():
    sweep = {"setting": "tau", "value": [0.5, 0.5, 1.3], "run_seed": [0, 1, 0],
             "dream_mean": [300.0, 100.0, 50.0], "dream_std": [10.0, 30.0, 5.0],
             "real_mean": [-50.0, 10.0, 40.0], "real_std": [0.0, 10.0, 0.0],
             "scores": [[-50.0, -50.0], [0.0, 20.0], [40.0, 40.0]], "episodes": 2, "seed": 0}
    ax = figures.sweep_table(sweep).axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == [200.0, -20.0, 50.0, 40.0]  # per value: dream (mean of runs), real (all episodes pooled)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.5", "1.3"]
    dots = [line for line in ax.get_lines() if line.get_marker() == "."]
    assert [list(d.get_ydata()) for d in dots] == [[-50.0, 10.0], [40.0]]
    assert any("env seeds 0..1" in t.get_text() for t in ax.get_legend().get_texts())
    ax = figures.sweep_table({**sweep, "setting": "inputs", "value": ["z", "z", "zh"]}).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["z (V only)", "z and h (V and M)"]


def test_score_histogram_counts_every_episode_and_names_the_seeds():
    fig = figures.score_histogram({"scores": [1.0, 2.0, 3.0], "mean": 2.0, "std": 0.8165, "seed": 5})
    ax = fig.axes[0]
    assert ax.get_title() == "3 episodes (env seeds 5..7): 2.0 +- 0.8"
    assert sum(patch.get_height() for patch in ax.patches) == 3


def test_selection_figure_needs_dream_returns():
    row = {"name": "seed_0", "dream_return": float("nan"), "real_mean": 1.0, "real_std": 0.0, "scores": [1.0]}
    with pytest.raises(ValueError, match="no candidate has a dream return"):
        figures.selection({"chosen": "seed_0", "episodes": 1, "candidates": [row]})
    fig = figures.selection({"chosen": "seed_0", "episodes": 1, "candidates": [{**row, "dream_return": 2.0}]})
    assert [t.get_text() for t in fig.axes[0].texts] == ["seed_0"]  # each candidate named beside its dot


def test_selection_figure_draws_a_candidate_the_dream_did_not_score_at_its_real_mean():
    scored = {"name": "seed_0", "dream_return": 2.0, "real_mean": 1.0, "real_std": 0.0, "scores": [1.0]}
    incumbent = {"name": "incumbent", "dream_return": float("nan"), "real_mean": 5.0, "real_std": 2.0,
                 "scores": [3.0, 7.0, 3.0, 7.0]}
    fig = figures.selection({"chosen": "incumbent", "episodes": 4, "candidates": [scored, incumbent]})
    ax = fig.axes[0]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [5.0, 5.0]
    band = ax.patches[-1].get_path().get_extents().transformed(ax.patches[-1].get_patch_transform())
    assert (band.y0, band.y1) == pytest.approx((4.0, 6.0))  # +- std / sqrt(4 episodes)
    labels = ax.get_legend_handles_labels()[1]
    assert "incumbent, not scored in this dream (chosen by reality)" in labels
    assert "chosen by reality" not in labels  # no scored candidate is ringed
