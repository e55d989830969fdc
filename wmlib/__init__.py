"""World Models (Ha & Schmidhuber, 2018) in JAX + Equinox."""

import gymnasium as _gym

__version__ = "0.1.0"

# wmlib.fast.render.CarRacingFast: CarRacing-v3 with byte-identical observations, about twice as fast.
# Registered by entry point, so `import wmlib` does not load pygame and Box2D; same limits as stock.
if "wmlib/CarRacingFast-v3" not in _gym.registry:
    _stock = _gym.spec("CarRacing-v3")
    _gym.register(id="wmlib/CarRacingFast-v3", entry_point="wmlib.fast.render:CarRacingFast",
                  max_episode_steps=_stock.max_episode_steps,
                  reward_threshold=_stock.reward_threshold)
