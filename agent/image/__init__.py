"""OCI image handling on the agent: the safe, whiteout-aware layer unpacker (SPEC IMG-12..IMG-16)."""
