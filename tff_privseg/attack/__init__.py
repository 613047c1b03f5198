"""Privacy attacks on the training's releases: gradient inversion and membership inference."""
