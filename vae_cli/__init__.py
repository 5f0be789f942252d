"""vae: train Variational Autoencoders on images; classify with few labels, generate, reconstruct."""

__version__ = "0.1.0"
