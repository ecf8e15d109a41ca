"""vae-ray: variational autoencoders trained, tuned and sampled at cluster scale on Ray."""

__version__ = "0.1.0"
