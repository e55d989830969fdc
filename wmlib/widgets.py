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
        super().__init__([W.HBox([self.image, W.VBox(self.sliders)], layout=W.Layout(align_items="flex-start")),
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


class DreamPlayer(W.VBox):
    """Drive inside M's dream, decoded through V, as in the original article.

    The dream starts from a real frame (M warmed up on the frames before it). Play (or the "step"
    slider) moves through time; "tau" is the sampling temperature; "steer", "gas" and "brake" set the
    action from the current step on; with a controller, "driver" switches between you and C. Every
    change re-dreams the whole episode with the same random numbers, so the past stays put and only
    what you changed (or tau) alters the course.
    """

    def __init__(self, mdnrnn, decode, mu: np.ndarray, actions: np.ndarray, controller=None, start: int = 0,
                 max_steps: int = 200, seed: int = 0, scale: int = 4, interval_ms: int = 100):
        import jax
        import jax.numpy as jnp

        from wmlib.controller import Controller
        from wmlib.dream import drive, start_from_frame

        self._drive, self._jnp = drive, jnp
        self.mdnrnn, self.decode, self.scale = mdnrnn, decode, scale
        self.controller = controller if controller is not None else Controller(mdnrnn.z_dim, mdnrnn.hidden)
        self.state0 = start_from_frame(mdnrnn, jnp.asarray(mu), jnp.asarray(actions), start)
        self.key = jax.random.PRNGKey(seed)
        self.manual = np.tile(np.array([0.0, 0.3, 0.0], np.float32), (max_steps, 1))
        self.use_controller = np.full(max_steps, controller is not None)
        self.play = W.Play(value=0, min=0, max=max_steps, step=1, interval=interval_ms, description="play")
        self.step = W.IntSlider(0, 0, max_steps, description="step")
        W.jslink((self.play, "value"), (self.step, "value"))
        self.tau = W.FloatSlider(1.0, min=0.05, max=2.0, step=0.05, description="tau")
        self.steer = W.FloatSlider(0.0, min=-1, max=1, step=0.05, description="steer")
        self.gas = W.FloatSlider(0.3, min=0, max=1, step=0.05, description="gas")
        self.brake = W.FloatSlider(0.0, min=0, max=1, step=0.05, description="brake")
        self.driver = W.ToggleButtons(options=["controller", "you"] if controller is not None else ["you"],
                                      description="driver")
        self.info = W.Label()
        self.step.observe(lambda _: self.update(), "value")
        self.tau.observe(lambda _: self.redream(), "value")
        for w in (self.steer, self.gas, self.brake, self.driver):
            w.observe(self._on_controls, "value")
        self.redream(draw=False)
        self.image = _image(self.render())
        self._caption()
        super().__init__([W.HBox([self.play, self.step]), W.HBox([self.image, W.VBox(
            [self.driver, self.steer, self.gas, self.brake, self.tau, self.info])])])

    def _on_controls(self, _) -> None:
        t = self.step.value
        self.manual[t:] = [self.steer.value, self.gas.value, self.brake.value]
        self.use_controller[t:] = self.driver.value == "controller"
        self.redream()

    def redream(self, draw: bool = True) -> None:
        jnp = self._jnp
        self.traj = self._drive(self.key, self.state0, self.mdnrnn, jnp.asarray(self.tau.value, jnp.float32),
                                jnp.asarray(self.manual), jnp.asarray(self.use_controller), self.controller)
        if draw:
            self.update()

    def render(self) -> np.ndarray:
        return viz.upscale(np.asarray(self.decode(np.asarray(self.traj.z[self.step.value])[None]))[0], self.scale)

    def _caption(self) -> None:
        t = self.step.value
        reward = float(np.sum(np.asarray(self.traj.reward[:t])))
        done = float(self.traj.done_prob[t - 1]) if t else 0.0
        self.info.value = f"dream reward so far {reward:.1f}   P(done) {done:.2f}"

    def update(self) -> None:
        self.image.value = viz.png_bytes(self.render())
        self._caption()


class MDNTemperature(W.VBox):
    """The 1-D mixture density toy sampled at the temperature set by the "tau" slider: the data and one
    sample per input in one plot. `sample(tau) -> ys` at the inputs `xs` (same random numbers at every
    tau, so only the temperature changes the picture)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, xs: np.ndarray, sample):
        self.x, self.y, self.xs, self.sample = x, y, xs, sample
        self.tau = W.FloatSlider(1.0, min=0.05, max=2.0, step=0.05, description="tau")
        self.image = _image(self.render())
        self.tau.observe(lambda _: self.update(), "value")
        super().__init__([self.tau, self.image])

    def render(self) -> np.ndarray:
        tau = self.tau.value
        return viz.mdn_samples(self.x, self.y, self.xs, self.sample(tau), f"samples at tau = {tau:.2f}")

    def update(self) -> None:
        self.image.value = viz.png_bytes(self.render())


class GenerationBrowser(W.VBox):
    """Step through a CMA-ES run (`evolve.history`) with the "generation" slider: the dream returns of
    each generation's best candidates with a marker at the chosen one, and that generation's search
    mean driving in the dream. `dream(flat_params) -> (frames (T, 64, 64, 3), dream return)`."""

    def __init__(self, history: dict[str, np.ndarray], dream, n_frames: int = 10):
        self.history, self.dream, self.n_frames = history, dream, n_frames
        G = len(history["mean"])
        self.generation = W.IntSlider(1, 1, G, description="generation")
        strip, plot, caption = self.render()
        self.image, self.plot, self.info = _image(strip), _image(plot), W.Label(caption)
        self.generation.observe(lambda _: self.update(), "value")
        super().__init__([self.generation, self.info, self.image, self.plot])

    def render(self) -> tuple[np.ndarray, np.ndarray, str]:
        """(the search mean's dream filmstrip, the returns plot, the caption) at the chosen generation."""
        g, top = self.generation.value, self.history["top_return"]
        frames, ret = self.dream(self.history["mean"][g - 1])
        plot = viz.line_strip({"best candidate": top[:, 0], f"{top.shape[1]}th best": top[:, -1]}, g,
                              xlabel="generation", start=1)
        return viz.filmstrip(frames, n=self.n_frames), plot, \
            f"the search mean after generation {g}, driving in the dream: return {ret:.1f}"

    def update(self) -> None:
        strip, plot, self.info.value = self.render()
        self.image.value, self.plot.value = viz.png_bytes(strip), viz.png_bytes(plot)


class RealDreamPlayer(W.VBox):
    """M dreams from a real frame of a recorded episode, fed the episode's REAL actions
    (`viz.real_vs_dream`): real frame | V's reconstruction | M's dream, side by side. "start" is the
    frame where the dream leaves reality, "step" (and play) the steps since then.

    `panels`: `sim2real.episode_panels` of the episode (frame, recon, z); `actions` (T, 3) its actions.
    """

    def __init__(self, mdnrnn, decode, panels: dict[str, np.ndarray], actions: np.ndarray, steps: int = 60,
                 seed: int = 0, scale: int = 3, interval_ms: int = 150):
        import jax

        self.mdnrnn, self.decode, self.panels, self.actions, self.scale = mdnrnn, decode, panels, actions, scale
        self.key = jax.random.PRNGKey(seed)
        self.steps = min(steps, len(actions) - 1)
        self.start = W.IntSlider(0, 0, len(actions) - 1 - self.steps, description="start")
        self.play = W.Play(value=0, min=0, max=self.steps, step=1, interval=interval_ms, description="play")
        self.step = W.IntSlider(0, 0, self.steps, description="step")
        W.jslink((self.play, "value"), (self.step, "value"))
        self.redream(draw=False)
        self.image = _image(self.render())
        self.start.observe(lambda _: self.redream(), "value")
        self.step.observe(lambda _: self.update(), "value")
        super().__init__([W.HBox([self.play, self.step, self.start]),
                          W.Label("real frame | what V sees | M's dream, fed the real actions"), self.image])

    def redream(self, draw: bool = True) -> None:
        self.dream = viz.real_vs_dream(self.mdnrnn, self.decode, self.panels["z"], self.actions, self.start.value,
                                       self.steps, self.key)
        if draw:
            self.update()

    def render(self) -> np.ndarray:
        s = self.step.value
        t = self.start.value + s
        return viz.panel_row([self.panels["frame"][t], self.panels["recon"][t], self.dream["frames"][s]], self.scale)

    def update(self) -> None:
        self.image.value = viz.png_bytes(self.render())


class EpisodeScrubber(W.VBox):
    """Step through a recorded episode ("step" slider): frame | V's reconstruction | M's prediction |
    the car on the track map, and below it the real reward beside the reward M predicted and C's
    steer, gas and brake, with a marker at the current step.

    `panels`: `sim2real.episode_panels` of `episode`; `track`: its centre line (`env.track_of_seed`).
    """

    def __init__(self, panels: dict[str, np.ndarray], episode, track: np.ndarray, scale: int = 3):
        self.panels, self.episode, self.track, self.scale = panels, episode, track, scale
        self.step = W.IntSlider(0, 0, len(episode) - 1, description="step")
        self.image = _image(self.render_frames())
        self.plot = _image(self.render_plot())
        self.step.observe(lambda _: self.update(), "value")
        super().__init__([self.step, W.Label("real frame | what V sees | what M predicted | where the car is"),
                          self.image, self.plot])

    def render_frames(self) -> np.ndarray:
        t = self.step.value
        frames = viz.panel_row([self.panels["frame"][t], self.panels["recon"][t], self.panels["dream"][t]], self.scale)
        return viz.hstack([frames, viz.track_map(self.track, self.episode.info["car_xy"], t, size=64 * self.scale)],
                          pad=4)

    def render_plot(self) -> np.ndarray:
        t, ep = self.step.value, self.episode
        rewards = viz.line_strip({"real reward": ep.rewards, "M's predicted reward": self.panels["reward_pred"]}, t)
        actions = viz.line_strip({name: ep.actions[:, i] for i, name in enumerate(("steer", "gas", "brake"))}, t)
        return viz.vstack([rewards, actions])

    def update(self) -> None:
        self.image.value = viz.png_bytes(self.render_frames())
        self.plot.value = viz.png_bytes(self.render_plot())
