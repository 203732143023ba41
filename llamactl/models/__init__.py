"""Model files: the GGUF header reader, the catalog (names, listing), pulls, and the default model.

Kept empty: importing a wing must cost nothing (serve's time to ready)."""
