"""Benchmarks of marvin-faust against baselines measured in the same run (``make bench``).

Every worker the bench starts gets its settings explicitly.
"""
