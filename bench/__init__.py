"""Throughput benchmark of khala-stream (issue #5): `make bench` = `.venv/bin/python -m bench`.

Not part of the test run. See bench/README.md.
"""
