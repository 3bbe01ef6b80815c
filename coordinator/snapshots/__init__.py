"""Snapshots of running sandboxes and the runtime references to them (SPEC §10)."""
