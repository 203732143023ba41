"""Serving: llama-server's flags, the listening sockets, the proxy (hot path), upstreams and
their supervision, state records.

Kept empty: importing a wing must cost nothing (serve's time to ready)."""
