"""Every lesson run in a real JupyterLab (Chromium + Playwright), and its widgets driven by mouse and
keyboard: what nbmake cannot see (widget views, callbacks that raise, images that never update).

Each test opens notebooks/NAME.ipynb at the `smoke` preset, runs Run > Run All Cells, fails with the
cell's traceback if any cell raised, any output shows a traceback or "Error displaying widget", or
the kernel logged an exception (a widget callback that raises ends up there), then checks the lesson's
widgets. A test is skipped only while its notebook does not exist yet.

What the notebooks must provide (widget descriptions are matched from the start of the label: "tau"
matches "tau" and "tau (temperature)", not "taux"). Each control must live in the same widget box
(VBox/HBox tree) as the ipywidgets.Image it drives: the test looks for the image in the smallest box
around the control that holds one. The first matching widget in the notebook is used.

- 01_data_collection: at least one matplotlib figure.
- 02_vae, the latent scrubber (`wmlib.widgets.LatentScrubber`): FloatSliders described "z[<dim>] ...";
  dragging the first one changes the decoded image; a Button "random z" changes it again.
- 03_mdnrnn, the MDN toy's temperature (`wmlib.widgets.MDNTemperature`, section 1): the first slider
  described "tau" must change its image. The dream player (`wmlib.widgets.DreamPlayer`): one widget
  box holding an ipywidgets.Play, the dream image, and sliders described "step" (the time step,
  jslinked to the Play), "tau" and "steer". Pressing play must change the image at least twice;
  then, paused at a step > 0, moving "tau" must change the image; and after moving "steer", the image
  three steps ahead (step slider, ArrowRight x3) must differ from the image three steps ahead
  without steering.
- 04_dream_evolution: at least one matplotlib figure (an image/png output, i.e. `plt.show()` under
  the inline backend); the dream player's "step" slider (the first one) must change its image when
  dragged and again on ArrowRight x3; the CMA-ES generation browser (`wmlib.widgets.GenerationBrowser`):
  the slider described "generation" (ArrowRight x3) must change both its images (filmstrip and plot).
- 05_sim2real: at least one matplotlib figure; the episode scrubber (`wmlib.widgets.EpisodeScrubber`):
  the first slider described "step" must change both its images (frames with the map; rewards and
  actions) when dragged and again on ArrowRight x3; the real-vs-dream player
  (`wmlib.widgets.RealDreamPlayer`): dragging "start" must change its image, and so must its own
  "step" slider (ArrowRight x3).

Run: `uv run pytest tests/browser` (about 20 s per notebook beyond its own run time; screenshots and
the server log go to tests/artifacts/browser/). Leave them out with `-m "not browser"` or
WM_SKIP_BROWSER=1; they skip by themselves where no Chromium is installed. WM_BROWSER_NOTEBOOKS=DIR
runs them against another folder of notebooks under the repo (e.g. a scratch copy with a deliberately
broken widget, to see the checks fail).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / os.environ.get("WM_BROWSER_NOTEBOOKS", "notebooks")

pytestmark = pytest.mark.browser


def notebook_or_skip(name: str) -> str:
    if not (NOTEBOOKS / name).exists():
        pytest.skip(f"notebook not written yet: {NOTEBOOKS.relative_to(REPO)}/{name}")
    return name


def run_notebook(lab, name: str) -> None:
    lab.open(notebook_or_skip(name))
    lab.run_all()
    print(f"{name}: Run All Cells took {lab.run_all_s:.0f} s in JupyterLab")


def check_slider_changes_image(lab, description, how: str = "drag") -> bytes:
    """Move the slider described `description`; every image in its widget box must change (a plot
    under the frames too) and nothing may raise. Returns the first image as shown in the end."""
    slider = lab.slider(description)
    slider.scroll_into_view_if_needed()
    box, img = lab.widget_box(slider)
    others = box.locator("img").all()[1:]
    move = (lambda: lab.drag_slider(slider)) if how == "drag" else (lambda: lab.nudge_slider(slider))
    value = lab.slider_value(slider)
    what = f"moving the slider {slider_label(slider)!r} from {value} ({how})"
    lab.settle()
    before = [lab.image_bytes(other) for other in others]
    shown = lab.expect_image_change(img, move, what)
    for i, (other, image) in enumerate(zip(others, before)):
        lab.wait_image_change(other, image, f"{what} (image {i + 2} of its widget)")
    return shown


def slider_label(slider) -> str:
    return slider.locator(".widget-label").first.text_content().strip()


def test_notebook_01_runs_in_lab(lab):
    run_notebook(lab, "01_data_collection.ipynb")
    lab.assert_matplotlib_images(1)
    lab.screenshot("figures")


def test_notebook_02_latent_scrubber(lab):
    run_notebook(lab, "02_vae.ipynb")
    check_slider_changes_image(lab, re.compile(r"^\s*z\["))
    lab.screenshot("z-dragged")
    img = lab.image_near(lab.button("random z"))
    lab.expect_image_change(img, lambda: lab.click_button("random z"), 'clicking "random z"')
    lab.screenshot("random-z")


def test_notebook_03_mdn_toy_and_dream_player(lab):
    run_notebook(lab, "03_mdnrnn.ipynb")
    check_slider_changes_image(lab, "tau")  # the first "tau": the MDN toy of section 1, above the player
    lab.screenshot("toy-tau")
    play = lab.play_widget()
    play.scroll_into_view_if_needed()
    player, img = lab.widget_box(play)
    lab.settle()
    first = lab.image_bytes(img)
    lab.watch_image(img)
    lab.play(play)
    deadline = time.monotonic() + 90
    while lab.image_updates(img) < 2 and time.monotonic() < deadline:  # two new frames while playing
        time.sleep(0.1)
    lab.screenshot("playing")
    assert lab.image_updates(img) >= 2 and lab.image_bytes(img) != first, (
        f"03_mdnrnn.ipynb: pressing Play gave {lab.image_updates(img)} new frame(s) in 90 s, expected "
        f"at least 2" + "".join(f"\n\n{e}" for e in lab.errors()))
    if lab.is_playing(play):
        lab.play(play)  # pause (at a step > 0), so that only the sliders move the picture from here on
    lab.assert_no_errors()

    tau = lab.slider("tau", within=player)
    lab.expect_image_change(img, lambda: lab.drag_slider(tau), "moving 'tau'")
    lab.screenshot("tau")

    # Steering changes the course: a few steps ahead, the dream differs from the one without it.
    step = lab.slider("step", within=player)
    handle = step.locator(".noUi-handle").first
    now, top = (float(handle.get_attribute(a) or "nan") for a in ("aria-valuenow", "aria-valuemax"))
    if now > top - 3:  # Play ran to the end: go back a little, so that there is room to look ahead
        lab.expect_image_change(img, lambda: lab.nudge_slider(step, 4, "ArrowLeft"), "moving 'step' back")
    t0 = lab.slider_value(step)
    without = lab.expect_image_change(img, lambda: lab.nudge_slider(step, 3, "ArrowRight"),
                                      f"moving 'step' ahead from {t0}")
    t1 = lab.slider_value(step)
    lab.expect_image_change(img, lambda: lab.nudge_slider(step, 3, "ArrowLeft"),
                            f"moving 'step' back to {t0}")
    assert lab.slider_value(step) == t0, f"'step' went to {lab.slider_value(step)} instead of back to {t0}"
    steer = lab.slider("steer", within=player)
    lab.drag_slider(steer)
    lab.assert_no_errors()  # (the frame at the current step may stay: steering acts from here on)
    with_steer = lab.expect_image_change(img, lambda: lab.nudge_slider(step, 3, "ArrowRight"),
                                         f"moving 'step' ahead from {t0} after steering")
    assert lab.slider_value(step) == t1, f"'step' went to {lab.slider_value(step)} instead of {t1}"
    lab.screenshot("steer")
    assert with_steer != without, (f"03_mdnrnn.ipynb: at step {t1} the dream looks the same with "
                                   f"'steer' at {lab.slider_value(steer)} as without steering")


def test_notebook_04_dream_player_and_generations(lab):
    run_notebook(lab, "04_dream_evolution.ipynb")
    lab.assert_matplotlib_images(1)
    lab.screenshot("figures")
    check_slider_changes_image(lab, "step", how="drag")
    check_slider_changes_image(lab, "step", how="keyboard")
    check_slider_changes_image(lab, "generation", how="keyboard")  # at smoke 2 generations: a drag may not reach 2
    lab.screenshot("generation")


def test_notebook_05_episode_scrubber_and_real_dream_player(lab):
    run_notebook(lab, "05_sim2real.ipynb")
    lab.assert_matplotlib_images(1)
    lab.screenshot("figures")
    check_slider_changes_image(lab, "step", how="drag")  # the first "step": the episode scrubber
    check_slider_changes_image(lab, "step", how="keyboard")
    lab.screenshot("step")
    start = lab.slider("start")
    start.scroll_into_view_if_needed()
    player, img = lab.widget_box(start)
    lab.expect_image_change(img, lambda: lab.drag_slider(start), "moving the real-vs-dream player's 'start'")
    step = lab.slider("step", within=player)
    lab.expect_image_change(img, lambda: lab.nudge_slider(step), "moving the real-vs-dream player's 'step'")
    lab.screenshot("real-vs-dream")
