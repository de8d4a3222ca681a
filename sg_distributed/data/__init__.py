"""Datasets for the sparse-gradient fine-tuning experiments."""
