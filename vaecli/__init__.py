"""vaecli: a command-line latent codec for diffusion-model autoencoders."""

__version__ = "0.1.0"
