"""Autoencoder networks, one self-contained file per family."""
