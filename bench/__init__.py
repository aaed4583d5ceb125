"""A load benchmark for REAPI servers: bgrid, BuildGrid and a null server, side by side.

Run ``python -m bench --help``; docs/benchmarks.md describes the method.
"""
