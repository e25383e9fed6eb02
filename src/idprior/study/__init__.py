"""The study harness beside the pipeline: quality grids, paired statistics, their reports, and what the benchmark scripts share."""
