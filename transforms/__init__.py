"""lpips-pipe's building blocks: score math, weights and scorer, record decoding, Beam transforms.

Importing this package has no side effects (no logging set-up); the public names are re-exported by
``lpips_pipe``.
"""
