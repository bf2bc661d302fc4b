"""The workflows that wire the lower layers together: the benchmark (`supermerge demo` and
`supermerge bench`), which builds experts (eval), merges with every data-free method
(engine, through :func:`supermerge.api.merge`) and every learned one (learn), and scores
them (eval)."""

from supermerge.run.bench import BenchmarkConfig, run_benchmark

__all__ = ["BenchmarkConfig", "run_benchmark"]
