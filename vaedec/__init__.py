"""vaedec: fine-tune only the decoder of a Stable Diffusion-family VAE from precomputed latent shards."""

__version__ = "0.1.0"
