"""CarRacingFast: CarRacing-v3 with byte-identical observations, about twice as fast.

`wmlib.env.make_env(fast=True)` builds it (registered as "wmlib/CarRacingFast-v3" in
wmlib/__init__.py); `make_env(fast=False)` builds the stock Gymnasium environment, the reference
that tests/test_fast_env.py steps in lockstep with this one (same seed and actions: the same
observation bytes, rewards and terminations).

A stock CarRacing step spends about 60% of its time in Python geometry: every frame rotates the
~2,800 vertices of ~700 grass and road polygons one `pygame.math.Vector2` at a time, culls them in
Python, reloads the font and allocates two 1000x800 surfaces. `CarRacingFast` does the geometry with
numpy and leaves out work that changes no output pixel. The pixel work it must keep (polygon fills,
anti-aliased edges, the 1000x800 -> 96x96 smoothscale) is pygame's C code: about 2.1 of its 2.5 ms
per step on the 2-core development machine, which caps any pixel-identical CarRacing there at about
2.4x stock (bench/env_floor.py); this one reaches about 2x (bench/env_speed.py).

Stock draws each frame on a fresh 1000x800 canvas C (background, grass, road, car), flips it upside
down into F, draws the indicator bar (rows 700..799) and the score on F, and returns
smoothscale(F, (96, 96)). CarRacingFast gets the same bytes because:
(1) pygame.math.Vector2.rotate_rad is cos*x - sin*y, sin*x + cos*y in doubles, with sin and cos
    of the angle reduced to [0, 2 pi) and exact values at right angles; numpy float64 repeats it
    operation by operation (`_rotation`);
(2) every polygon that can change a pixel we keep goes to the same gfxdraw / pygame.draw call,
    with the same float coordinates and colours, in the same order;
(3) the polygons left out change no kept pixel: their bounding box misses the window, or lies
    in C's rows 0..99, which become F's rows 700..799 and are painted over by the opaque bar;
(4) smoothscale shrinks each row on its own first, then the columns (checked in the tests), so
    F's rows that come from C are shrunk straight from C, and only the shrunk rows (96 pixels
    wide) are flipped; F itself is only materialised where the bar is drawn.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pygame
from gymnasium.envs.box2d import car_dynamics
from gymnasium.envs.box2d.car_racing import (
    GRASS_DIM,
    MAX_SHAPE_DIM,
    PLAYFIELD,
    SCALE,
    STATE_H,
    STATE_W,
    VIDEO_H,
    VIDEO_W,
    WINDOW_H,
    WINDOW_W,
    ZOOM,
    CarRacing,
)
from pygame import gfxdraw

_VECTOR_EPSILON = 1e-6  # pygame.math.Vector2's default epsilon for its right-angle special case
_EXACT_TURNS = ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))  # (cos, sin) at 0, 90, 180, 270

_BAR_TOP = WINDOW_H - 5 * WINDOW_H // 40  # 700: F's rows from here down are the indicator bar
_HIDDEN_ROWS = WINDOW_H - _BAR_TOP  # C's rows 0..99, under the bar once flipped
# A polygon whose screen bounding box misses a region by more than this many pixels touches no
# pixel of it (coordinates are truncated to integers, anti-aliased edges reach a pixel further).
_PIXEL_MARGIN = 4.0
# When the background square covers the window with this margin, filling the window with its
# colour writes exactly what its scanline fill would (its anti-aliased edges lie off-screen).
_FILL_MARGIN = 8.0
_SCREEN_CORNERS = ((-_FILL_MARGIN, -_FILL_MARGIN), (WINDOW_W + _FILL_MARGIN, -_FILL_MARGIN),
                   (WINDOW_W + _FILL_MARGIN, WINDOW_H + _FILL_MARGIN),
                   (-_FILL_MARGIN, WINDOW_H + _FILL_MARGIN))
# Farthest a window pixel lies from the car's screen position (W/2, H/4), plus slack, in pixels:
# polygons farther than this from the car cannot reach the window.
_VIEW_RADIUS = math.hypot(WINDOW_W / 2, WINDOW_H * 3 / 4) + 2 * _PIXEL_MARGIN


def _rotation(angle: float) -> tuple[float, float]:
    """(cos, sin) that pygame's Vector2.rotate_rad(angle) uses, right angles special-cased."""
    angle = math.fmod(angle, 2 * math.pi)
    if angle < 0:
        angle += 2 * math.pi
    if math.fmod(angle + _VECTOR_EPSILON, math.pi / 2) < 2 * _VECTOR_EPSILON:
        return _EXACT_TURNS[int((angle + _VECTOR_EPSILON) / (math.pi / 2)) % 4]
    return math.cos(angle), math.sin(angle)


def _grass_polygons() -> np.ndarray:
    """The 400 grass squares of CarRacing._render_road, (400, 4, 2) world units, stock order."""
    cells = [(x, y) for x in range(-20, 20, 2) for y in range(-20, 20, 2)]
    corners = ((1, 0), (0, 0), (0, 1), (1, 1))
    return np.array([[(GRASS_DIM * x + GRASS_DIM * cx, GRASS_DIM * y + GRASS_DIM * cy)
                      for cx, cy in corners] for x, y in cells], np.float64)


_GRASS = _grass_polygons()
_FIELD = np.array([(PLAYFIELD, PLAYFIELD), (PLAYFIELD, -PLAYFIELD),
                   (-PLAYFIELD, -PLAYFIELD), (-PLAYFIELD, PLAYFIELD)])


def _covers_window(cos: float, sin: float, zoom: float, translation) -> bool:
    """Whether the background square, drawn with this transform, covers the window grown by
    _FILL_MARGIN: the window's corners mapped back to the world lie inside the playfield."""
    tx, ty = translation
    for sx, sy in _SCREEN_CORNERS:
        dx, dy = (sx - tx) / zoom, (sy - ty) / zoom  # screen = R(angle) world zoom + translation
        if abs(cos * dx + sin * dy) >= PLAYFIELD or abs(cos * dy - sin * dx) >= PLAYFIELD:
            return False
    return True


def _rows(surface: pygame.Surface) -> np.ndarray:
    """A (height, pitch) uint8 view of a surface's pixels; it locks the surface while alive."""
    buffer = surface.get_buffer()  # a BufferProxy: it has the buffer protocol, pygame's stubs do not say so
    return np.frombuffer(buffer, np.uint8).reshape(surface.get_height(), -1)  # type: ignore[call-overload]


class CarRacingFast(CarRacing):
    """CarRacing-v3 with the same pixels, rewards and terminations, about twice as fast.

    Physics (Box2D, car_dynamics), the track and the drawing primitives are stock. Per frame:
    - grass and road polygons sit in arrays built once per track; numpy transforms and culls them
      and only those that can change a kept pixel go to gfxdraw (stock hands ~700 polygons to
      Python, about 30 reach the window);
    - the car is drawn with the same pygame.draw calls, its vertices rotated without Vector2s;
    - the canvas is kept between frames; the background is one fill when it covers the window;
    - the upside-down flip and the shrink to 96x96 are done on shrunk rows (see note (4) in the module docstring);
    - the score font is loaded once.
    `self.surf` after a state_pixels/rgb_array frame holds only the bar rows of the flipped frame.
    With `skip_pixels` set, steps return no observation (None) and draw nothing: physics, rewards and
    terminations are unchanged, so replaying recorded actions to a state costs the physics alone.
    """

    # stock CarRacing starts these as None (so a type checker reads them as always None)
    surf: Any
    screen: Any
    clock: Any

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._surfaces_cache = None  # surfaces in the current display's format, see _surfaces
        self._font = None
        self._score = (None, None)  # the last score string and its rendered surface
        self._track_source = None  # the road_poly list that _track_arrays was built from
        self.skip_pixels = False

    def _track_arrays(self):
        """Grass then road polygons: x, y (P, 4) and centre x, y, reach (P,), once per track."""
        if self._track_source is not self.road_poly:
            road = np.array([poly for poly, _ in self.road_poly], np.float64).reshape(-1, 4, 2)
            polys = np.concatenate([_GRASS, road])
            centres = polys.mean(axis=1)
            reach = np.sqrt(((polys - centres[:, None]) ** 2).sum(axis=2)).max(axis=1) + 1.0
            self._track = (polys[..., 0].copy(), polys[..., 1].copy(),
                           centres[:, 0].copy(), centres[:, 1].copy(), reach)
            self._road_colors = [color for _, color in self.road_poly]
            self._track_source = self.road_poly
        return self._track

    def _surfaces(self) -> dict:
        """Surfaces kept between frames, in the format pygame.Surface((W, H)) has right now.

        That format is the display's once a display exists (human mode), so they are remade when
        the display changes.
        """
        display = pygame.display.get_surface() if pygame.display.get_init() else None
        if self._surfaces_cache is None or self._surfaces_cache["display"] is not display:
            self._surfaces_cache = {
                "display": display,
                "canvas": pygame.Surface((WINDOW_W, WINDOW_H)),  # C
                "flipped": pygame.Surface((WINDOW_W, WINDOW_H)),  # F
                "scratch": pygame.Surface((4, 4)),  # to learn the background's pixel value
            }
        return self._surfaces_cache

    def _render(self, mode: str):
        assert mode in self.metadata["render_modes"]
        if self.skip_pixels and mode == "state_pixels":
            return None

        pygame.font.init()
        if self.screen is None and mode == "human":
            pygame.display.init()
            self.screen = pygame.display.set_mode((WINDOW_W, WINDOW_H))
        if self.clock is None:
            self.clock = pygame.time.Clock()

        if "t" not in self.__dict__:
            return  # reset() not called yet

        surfaces = self._surfaces()
        canvas, flipped = surfaces["canvas"], surfaces["flipped"]
        self.surf = canvas

        assert self.car is not None
        # computing transformations (as stock)
        angle = -self.car.hull.angle
        # Animating first second zoom.
        zoom = 0.1 * SCALE * max(1 - self.t, 0) + ZOOM * SCALE * min(self.t, 1)
        scroll_x = -(self.car.hull.position[0]) * zoom
        scroll_y = -(self.car.hull.position[1]) * zoom
        rotated = pygame.math.Vector2((scroll_x, scroll_y)).rotate_rad(angle)
        trans = (WINDOW_W / 2 + rotated[0], WINDOW_H / 4 + rotated[1])

        self._render_road(zoom, trans, angle)
        self._draw_car(zoom, trans, angle, draw_particles=mode != "state_pixels")

        # F's rows [first, H) are materialised: human mode shows all of F, the pixel modes need
        # only the bar, plus any rows a long indicator reaches above it.
        self.surf = flipped
        first = 0 if mode == "human" else _BAR_TOP
        _rows(flipped)[first:_BAR_TOP] = _rows(canvas)[WINDOW_H - _BAR_TOP:WINDOW_H - first][::-1]
        top = self._render_bar()
        if top < first:
            _rows(flipped)[top:first] = _rows(canvas)[WINDOW_H - first:WINDOW_H - top][::-1]
            self._render_bar()  # again, over the rows just copied
            first = top

        if mode == "human":
            pygame.event.pump()
            self.clock.tick(self.metadata["render_fps"])
            assert self.screen is not None
            self.screen.fill(0)
            self.screen.blit(self.surf, (0, 0))
            pygame.display.flip()
        elif mode == "rgb_array":
            return self._shrink(canvas, flipped, first, (VIDEO_W, VIDEO_H))
        else:
            return self._shrink(canvas, flipped, first, (STATE_W, STATE_H))

    def _shrink(self, canvas: pygame.Surface, flipped: pygame.Surface, first: int,
                size: tuple[int, int]) -> np.ndarray:
        """smoothscale(F, size) as an (h, w, 3) array, as stock's _create_image_array returns it.

        Row by row: F's rows [0, first) are C's rows flipped, so C's rows are shrunk in width and
        then flipped; F's rows [first, H) (the bar) are shrunk from F. Then the column shrink.
        """
        width, height = size
        surfaces = self._surfaces()
        if width not in surfaces:
            surfaces[width] = pygame.Surface((width, WINDOW_H), 0, canvas)
        columns = surfaces[width]  # F shrunk in width only
        if first > 0:
            shrunk = pygame.transform.smoothscale(
                canvas.subsurface((0, WINDOW_H - first, WINDOW_W, first)), (width, first))
            _rows(columns)[:first] = _rows(shrunk)[::-1]
        pygame.transform.smoothscale(flipped.subsurface((0, first, WINDOW_W, WINDOW_H - first)),
                                     (width, WINDOW_H - first),
                                     columns.subsurface((0, first, width, WINDOW_H - first)))
        scaled = pygame.transform.smoothscale(columns, size)
        rgb = np.frombuffer(pygame.image.tobytes(scaled, "RGB"), np.uint8)
        return rgb.reshape(height, width, 3).copy()  # C-contiguous and writable, as stock's

    def _render_bar(self) -> int:
        """Indicators and score on F, as stock; returns the top row they drew on."""
        top = self._render_indicators(WINDOW_W, WINDOW_H)
        score = f"{self.reward:04.0f}"
        if self._score[0] != score:  # it changes every 10 steps or so
            if self._font is None:
                self._font = pygame.font.Font(pygame.font.get_default_font(), 42)
            self._score = score, self._font.render(score, True, (255, 255, 255), (0, 0, 0))
        text = self._score[1]
        text_rect = text.get_rect()
        text_rect.center = (60, WINDOW_H - WINDOW_H * 2.5 / 40.0)
        return min(top, self.surf.blit(text, text_rect).top)

    def _render_indicators(self, W, H) -> int:
        """Stock's indicator bar, same values and pixels; returns the top row drawn on.

        Stock's black background polygon [(W, H), (W, H - 5h), (0, H - 5h), (0, H)] fills exactly
        the rows H - 5h..H - 1 (checked in the tests), so it is a fill here.
        """
        s = W / 40.0
        h = H / 40.0
        top = int(H - 5 * h)
        self.surf.fill((0, 0, 0), (0, top, W, H - top))

        def vertical_ind(place, val):
            return [
                (place * s, H - (h + h * val)),
                ((place + 1) * s, H - (h + h * val)),
                ((place + 1) * s, H - h),
                ((place + 0) * s, H - h),
            ]

        def horiz_ind(place, val):
            return [
                ((place + 0) * s, H - 4 * h),
                ((place + val) * s, H - 4 * h),
                ((place + val) * s, H - 2 * h),
                ((place + 0) * s, H - 2 * h),
            ]

        car = self.car
        assert car is not None
        true_speed = np.sqrt(
            np.square(car.hull.linearVelocity[0]) + np.square(car.hull.linearVelocity[1])
        )
        indicators = [
            (true_speed, vertical_ind(5, 0.02 * true_speed), (255, 255, 255)),
            # ABS sensors
            (car.wheels[0].omega, vertical_ind(7, 0.01 * car.wheels[0].omega), (0, 0, 255)),
            (car.wheels[1].omega, vertical_ind(8, 0.01 * car.wheels[1].omega), (0, 0, 255)),
            (car.wheels[2].omega, vertical_ind(9, 0.01 * car.wheels[2].omega), (51, 0, 255)),
            (car.wheels[3].omega, vertical_ind(10, 0.01 * car.wheels[3].omega), (51, 0, 255)),
            (car.wheels[0].joint.angle, horiz_ind(20, -10.0 * car.wheels[0].joint.angle),
             (0, 255, 0)),
            (car.hull.angularVelocity, horiz_ind(30, -0.8 * car.hull.angularVelocity),
             (255, 0, 0)),
        ]
        for value, points, color in indicators:
            if abs(value) > 1e-4:  # render only if the indicator value is above a threshold
                rect = pygame.draw.polygon(self.surf, points=points, color=color)
                if rect.height and rect.width:
                    top = min(top, rect.top)
        return top

    def _render_road(self, zoom, translation, angle):
        """Background, grass, then road on C, as stock draws them, with numpy geometry.

        Left out (they change no kept pixel): polygons farther from the car than the window
        reaches, and polygons whose bounding box misses C's rows 100..799 by more than
        _PIXEL_MARGIN. Replaced: the background square's aapolygon + filled_polygon by one fill
        with the pixel value filled_polygon writes, when the square covers the window.
        """
        cos, sin = _rotation(angle)
        tx, ty = translation
        surf = self.surf
        kept = (0, _HIDDEN_ROWS, WINDOW_W, WINDOW_H - _HIDDEN_ROWS)

        if _covers_window(cos, sin, zoom, translation):
            scratch = self._surfaces()["scratch"]
            gfxdraw.filled_polygon(scratch, [(-8, -8), (8, -8), (8, 8), (-8, 8)], self.bg_color)
            surf.fill(scratch.get_at_mapped((1, 1)), kept)
        else:
            surf.fill(0, kept)  # what a freshly allocated stock canvas holds
            points = np.stack([(cos * _FIELD[:, 0] - sin * _FIELD[:, 1]) * zoom + tx,
                               (sin * _FIELD[:, 0] + cos * _FIELD[:, 1]) * zoom + ty], 1).tolist()
            gfxdraw.aapolygon(surf, points, self.bg_color)
            gfxdraw.filled_polygon(surf, points, self.bg_color)

        xs, ys, centre_x, centre_y, reach = self._track_arrays()
        car_x, car_y = self.car.hull.position
        near = np.flatnonzero((centre_x - car_x) ** 2 + (centre_y - car_y) ** 2
                              <= (_VIEW_RADIUS / zoom + reach) ** 2)
        xs, ys = xs[near], ys[near]
        px = (cos * xs - sin * ys) * zoom + tx
        py = (sin * xs + cos * ys) * zoom + ty
        # Stock's cull: some vertex lies in the window grown by MAX_SHAPE_DIM.
        stock = ((-MAX_SHAPE_DIM <= px) & (px <= WINDOW_W + MAX_SHAPE_DIM)
                 & (-MAX_SHAPE_DIM <= py) & (py <= WINDOW_H + MAX_SHAPE_DIM)).any(axis=1)
        touches = ((px.max(axis=1) >= -_PIXEL_MARGIN)
                   & (px.min(axis=1) <= WINDOW_W + _PIXEL_MARGIN)
                   & (py.max(axis=1) >= _HIDDEN_ROWS - _PIXEL_MARGIN)
                   & (py.min(axis=1) <= WINDOW_H + _PIXEL_MARGIN))
        drawn = np.flatnonzero(stock & touches)
        points = np.stack([px[drawn], py[drawn]], axis=-1).tolist()
        index = near[drawn]
        n_grass = len(_GRASS)
        n_road = int((index >= n_grass).sum())
        # Read every frame: FrictionDetector recolours a tile in place when the car touches it.
        # Truncated to int as stock's [int(c) for c in color].
        road_colors = np.array([self._road_colors[i - n_grass] for i in index[-n_road:]]
                               if n_road else np.zeros((0, 3))).astype(np.int64).tolist()
        colors = [self.grass_color] * (len(index) - n_road) + road_colors
        for poly, color in zip(points, colors):
            gfxdraw.aapolygon(surf, poly, color)
            gfxdraw.filled_polygon(surf, poly, color)

    def _draw_car(self, zoom, translation, angle, draw_particles):
        """car_dynamics.Car.draw, with each vertex rotated by arithmetic instead of a Vector2."""
        car = self.car
        surf = self.surf
        cos, sin = _rotation(angle)
        tx, ty = translation

        def to_screen(points):
            return [((cos * x - sin * y) * zoom + tx, (sin * x + cos * y) * zoom + ty)
                    for x, y in points]

        if draw_particles:
            for p in car.particles:
                pygame.draw.lines(surf, color=p.color, points=to_screen(p.poly), width=2,
                                  closed=False)

        w, r, size = car_dynamics.WHEEL_W, car_dynamics.WHEEL_R, car_dynamics.SIZE
        for obj in car.drawlist:
            for f in obj.fixtures:
                trans = f.body.transform
                path = [trans * v for v in f.shape.vertices]
                color = [int(c * 255) for c in obj.color]
                pygame.draw.polygon(surf, color=color, points=to_screen(path))

                if "phase" not in obj.__dict__:
                    continue
                a1 = obj.phase
                a2 = obj.phase + 1.2  # radians
                s1 = math.sin(a1)
                s2 = math.sin(a2)
                c1 = math.cos(a1)
                c2 = math.cos(a2)
                if s1 > 0 and s2 > 0:
                    continue
                if s1 > 0:
                    c1 = np.sign(c1)
                if s2 > 0:
                    c2 = np.sign(c2)
                white_poly = [(-w * size, +r * c1 * size), (+w * size, +r * c1 * size),
                              (+w * size, +r * c2 * size), (-w * size, +r * c2 * size)]
                pygame.draw.polygon(surf, color=car_dynamics.WHEEL_WHITE,
                                    points=to_screen([trans * v for v in white_poly]))

    def close(self):
        super().close()
        self._font, self._score = None, (None, None)  # pygame.quit() in human mode ends them
        self._surfaces_cache = None
