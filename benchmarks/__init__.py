"""petal_fast benchmarks: one script per op plus end-to-end; results in benchmarks/results/."""
