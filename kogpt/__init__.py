"""kogpt: run, generate with, train, evaluate and export Korean GPT models."""

__version__ = "0.1.0"
