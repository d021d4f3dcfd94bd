"""Benchmarks: toy problems, experiment runners, JSONL results, tables and plots."""
