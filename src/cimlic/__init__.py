"""cimlic: class-imbalanced multi-label image classification with vision-language models."""

__version__ = "0.1.0"
