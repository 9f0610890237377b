"""Benchmarks for oppsync (project issue 9; the benchmark items of issues 4 and 5).

`python -m benchmarks` runs them all at their default sizes, prints one table and rewrites
benchmarks/RESULTS.md. Each benchmark module exposes `run(args, workdir) -> list[Figure]`.
Speed and memory targets live here, never as timing assertions in the test suite.
"""
