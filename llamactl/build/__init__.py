"""The llama.cpp build: pinned source, hardware probes and the backend decision, the CMake
plan, running it, and the build cache.

Kept empty: importing a wing must cost nothing (serve's time to ready)."""
