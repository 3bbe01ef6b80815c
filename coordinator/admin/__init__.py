"""The admin surface: command registry, dispatcher and endpoint (WIRE-19, CLI-1..CLI-5)."""
