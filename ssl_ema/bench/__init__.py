"""Developer benchmarks (speed of the step, the EMA, distribution), apart from what users run."""
