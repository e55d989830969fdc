"""ipywidgets around the pure functions of `wmlib.viz`: sliders and buttons in, images out.

No logic lives here: each widget keeps the values its controls set and asks viz for the picture.
Images are `ipywidgets.Image` whose bytes are replaced on every change, so nothing flickers.
"""

from __future__ import annotations

import ipywidgets as W
import numpy as np

from wmlib import viz


def _image(array: np.ndarray) -> W.Image:
    return W.Image(value=viz.png_bytes(array), format="png")


class ReconstructionBrowser(W.VBox):
    """Pick an episode and a frame; see original | V's reconstruction | error.

    `episodes`: list of (T, 64, 64, 3) uint8 arrays; `reconstruct(frames) -> frames`.
    """

    def __init__(self, episodes: list[np.ndarray], reconstruct, scale: int = 3):
        self.episodes, self.reconstruct, self.scale = episodes, reconstruct, scale
        self.episode = W.IntSlider(0, 0, len(episodes) - 1, description="episode")
        self.frame = W.IntSlider(0, 0, len(episodes[0]) - 1, description="frame")
        self.image = _image(self.render())
        self.episode.observe(self._on_episode, "value")
        self.frame.observe(lambda _: self.update(), "value")
        super().__init__([W.HBox([self.episode, self.frame]), W.Label("original | reconstruction | error"),
                          self.image])

    def render(self) -> np.ndarray:
        frame = self.episodes[self.episode.value][self.frame.value]
        return viz.recon_panel(frame, np.asarray(self.reconstruct(frame[None]))[0], self.scale)

    def update(self) -> None:
        self.image.value = viz.png_bytes(self.render())

    def _on_episode(self, _) -> None:
        self.frame.max = len(self.episodes[self.episode.value]) - 1
        self.update()


class LatentScrubber(W.VBox):
    """One slider per latent dimension, most informative (largest KL) first; the decoded frame follows.

    Buttons: "z of this frame" (V's mean for the frame picked by the frame slider), "random z"
    (a draw from the prior N(0, I)), "reset" (z = 0). `decode(zs (N, z)) -> frames`.
    """

    def __init__(self, decode, kl: np.ndarray, frames: np.ndarray, encode, n_sliders: int = 12,
                 scale: int = 4, seed: int = 0):
        self.decode, self.encode, self.frames, self.scale = decode, encode, frames, scale
        self.order = [int(d) for d in np.argsort(-np.asarray(kl))][:n_sliders]
        self.z = np.zeros(len(kl), np.float32)
        self.rng = np.random.default_rng(seed)
        self._quiet = False
        self.sliders = [W.FloatSlider(0.0, min=-3, max=3, step=0.05, description=f"z[{d}] KL {kl[d]:.2f}",
                                      continuous_update=True, style={"description_width": "110px"})
                        for d in self.order]
        for d, s in zip(self.order, self.sliders):
            s.observe(self._on_slider(d), "value")
        self.frame = W.IntSlider(0, 0, len(frames) - 1, description="frame")
        self.from_frame, self.random, self.reset = W.Button(description="z of this frame"), \
            W.Button(description="random z"), W.Button(description="reset")
        self.from_frame.on_click(lambda _: self.set_z(np.asarray(self.encode(self.frames[self.frame.value][None]))[0]))
        self.random.on_click(lambda _: self.set_z(self.rng.standard_normal(len(self.z)).astype(np.float32)))
        self.reset.on_click(lambda _: self.set_z(np.zeros_like(self.z)))
        self.image = _image(self.render())
        super().__init__([W.HBox([self.image, W.VBox(self.sliders)]),
                          W.HBox([self.frame, self.from_frame, self.random, self.reset])])

    def render(self) -> np.ndarray:
        return viz.upscale(np.asarray(self.decode(self.z[None]))[0], self.scale)

    def update(self) -> None:
        self.image.value = viz.png_bytes(self.render())

    def _on_slider(self, d: int):
        def handler(change):
            self.z[d] = change["new"]
            if not self._quiet:
                self.update()
        return handler

    def set_z(self, z: np.ndarray) -> None:
        """Move every slider to `z` and redraw once."""
        self._quiet = True
        try:
            self.z = np.asarray(z, np.float32).copy()
            for d, s in zip(self.order, self.sliders):
                s.value = float(np.clip(self.z[d], -3, 3))
                self.z[d] = z[d]
        finally:
            self._quiet = False
        self.update()
