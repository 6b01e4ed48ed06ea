"""dreamguide: personalized text-to-image diffusion with parallel-rescaled consistency guidance."""

__version__ = "0.1.0"
