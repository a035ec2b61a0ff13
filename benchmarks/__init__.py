"""Benchmarks of the ddpm library, side by side with peers (``make bench``)."""
