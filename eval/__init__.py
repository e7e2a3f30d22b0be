"""Evaluation harness (imported as ``zoo.eval``): MAD, retrieval and commonsense tasks."""
