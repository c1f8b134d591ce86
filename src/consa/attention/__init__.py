"""Hybrid FA/SWA attention: masks, kernels, the registered attention function, the hybrid cache."""
