"""irtrain: post-training through the lens of implicit reward."""
__version__ = "0.1.0"
