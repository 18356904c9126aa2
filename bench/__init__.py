"""taskmill's benchmarks: ``python bench/run.py`` runs them (see docs/benchmarks.md)."""
