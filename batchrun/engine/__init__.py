"""Execution: model loading, the engines, sampling. The only package that imports torch.

The rest of batchrun talks to an engine through the plain objects in ``engine.requests``.
"""
