"""The terminal chat: an OpenAI-compatible client, its SSE reader, the session and its rendering.

Kept empty: importing a wing must cost nothing (serve's time to ready)."""
