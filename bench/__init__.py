"""fastbn benchmarks: peers, cases, STREAM bandwidth, the CLI, the CI gate and the A/B compare.

Nothing in ``fastbn`` imports this package.  Run ``python -m bench.cli --help``.
"""
