"""llamactl: build, supervise and serve upstream llama.cpp."""

__version__ = "0.1.0"
