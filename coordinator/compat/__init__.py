"""Compat (SPEC §8): replicas pin the versions they were made under; the pure evaluation
(``evaluate``), debounced heartbeat-driven node scans (``scanner``) and the matrix
(``matrix``)."""
