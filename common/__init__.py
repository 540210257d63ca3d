"""Shared, Flower-free code for fedmm: config, data, models."""
