"""Data: label sets, file formats, splits, datasets and samplers."""
