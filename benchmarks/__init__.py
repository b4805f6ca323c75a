"""`make bench`: every stage timed against a plain baseline in the same run (see BENCHMARKS.md)."""
