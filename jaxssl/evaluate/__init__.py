"""Evaluators of frozen representations: kNN (and, with later issues, linear probes)."""
