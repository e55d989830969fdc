"""Speed, kept apart from the method: each module here is a faster stand-in for plain code that the
lessons and the stage modules show, and a test checks that the two agree.

  render.py  CarRacingFast, CarRacing-v3's renderer with numpy geometry (env.make_env(fast=...))
  conv.py    V's strided (transposed) convolutions as im2col matrix products (vae.ConvVAE(fast=...))
  memory.py  glibc's allocator told to keep freed memory (the `wm` command sets it, not `import wmlib`)
"""
