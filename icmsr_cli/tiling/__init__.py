"""Images larger than memory: tile plans and the tiled VAE with exact GroupNorm statistics."""
