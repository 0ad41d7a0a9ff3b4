"""Existing apps run both bare and under ``workerkit run``: the same features, the same results."""
