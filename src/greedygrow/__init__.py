"""greedygrow: high-resolution pixel-space text-to-image diffusion by greedy growing."""

__version__ = "0.1.0"
