"""Training: Perlin masks, noise, losses, the loop, tiled and weak/mixed training."""
