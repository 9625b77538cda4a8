"""vaecli: a command-line latent codec for diffusion-model autoencoders, and its Python API (`vaecli.api`):

    import vaecli
    model = vaecli.load("taef2")
    latent = model.encode("photo.png")        # vaecli.Latent: .tensor (C, h, w), .meta
    pixels = model.decode(latent)             # (1, 3, H, W) float in [0, 1]

Also `Latent.save`, `load_latent`, `to_image`, and `Model.encode_video` / `Model.decode_video` for clips; errors are
`vaecli.errors.VaeError`s with the commands' messages.
"""

__version__ = "0.1.0"
__all__ = ["Latent", "Model", "load", "load_latent", "to_image"]


def __getattr__(name: str):
    """The API's names (`__all__`), imported on first use: `vae --help` must not import torch."""
    if name in __all__:
        from vaecli import api

        return getattr(api, name)
    raise AttributeError(f"module 'vaecli' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names with the lazy API's, for help(vaecli) and completion."""
    return sorted([*globals(), *__all__])
