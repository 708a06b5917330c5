"""Sweeps and paper tables: statistics, the runner, and the report."""
