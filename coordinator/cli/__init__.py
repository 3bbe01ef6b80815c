"""tcctl: the admin CLI, a thin client of the coordinator's admin endpoint."""
