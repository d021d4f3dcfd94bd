"""Metrics: distances to exact targets, sample quality and diversity, lineage counts."""
