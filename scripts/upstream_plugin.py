"""A pytest plugin for llama.cpp's own server tests (tools/server/tests) on a machine that cannot
reach Hugging Face: every server the tests start gets a local model file instead of the
preset's Hugging Face repository, file or URL, and the session's model pre-download
(`ServerPreset.load_all`) does nothing.

A router (`ServerPreset.router()`: no model at all) would list the models in the Hugging Face
cache; here it gets a --models-preset instead whose sections are the cache ids that
unit/test_router.py names, each `model = ` a symlink to the local model, so that its tests run
unchanged against router mode and through `llamactl serve` alike. The few tests that
download by design (NEEDS_NETWORK) are skipped.

Load it with `-p upstream_plugin` (this folder on PYTHONPATH) and name the model in
LLAMACTL_UPSTREAM_MODEL. scripts/upstream_server_tests.py does both."""

from __future__ import annotations

import atexit
import importlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

#: The models unit/test_router.py loads by id (MODEL_A, MODEL_B, MODEL_C there): Hugging Face
#: cache ids, repo:tag. Each becomes a section of the router's preset.
ROUTER_MODELS = (
    "ggml-org/tinygemma3-GGUF:Q8_0",
    "ggml-org/test-model-stories260K:F32",
    "ggml-org/test-model-stories260K-infill:F32",
)


#: Tests that download from Hugging Face by design (a model or a preset the test names, not a
#: preset's model that a local file can stand in for): skipped on both sides. Router mode,
#: offline, even reports the download it could not do as finished (run_download: "download
#: completed successfully" after "failed to resolve commit"), so test_router_delete_model
#: would pass against it without having tested anything.
NEEDS_NETWORK = {
    "test_router_remote_preset": "loads the preset ggml-org/test-preset-ci from Hugging Face",
    "test_router_download_model": "downloads a model through POST /models",
    "test_router_delete_model": "downloads a model through POST /models, then deletes it",
}


def _local_model() -> str:
    model = os.environ.get("LLAMACTL_UPSTREAM_MODEL", "")
    if not model or not os.path.isfile(model):
        raise SystemExit(f"upstream_plugin: LLAMACTL_UPSTREAM_MODEL={model!r} is not a file")
    return model


def router_preset(model: str, into: Path) -> Path:
    """An INI preset naming the default model under each of ROUTER_MODELS: one symlink per
    name (distinct files, as distinct models would be)."""
    lines = []
    for name in ROUTER_MODELS:
        link = into / (name.replace("/", "--").replace(":", "-") + ".gguf")
        link.symlink_to(os.path.abspath(model))
        lines += [f"[{name}]", f"model = {link}", ""]
    preset = into / "router.ini"
    preset.write_text("\n".join(lines))
    return preset


def pytest_configure(config: Any) -> None:
    """Patch upstream's utils before the first test: its conftest imported it already."""
    model = _local_model()
    utils = sys.modules.get("utils") or importlib.import_module("utils")
    server_process = utils.ServerProcess
    original_start = server_process.start
    scratch = Path(tempfile.mkdtemp(prefix="upstream-router-"))
    atexit.register(shutil.rmtree, scratch, True)
    preset = router_preset(model, scratch)

    def start(self: Any, *args: Any, **kwargs: Any) -> None:
        is_router = not (self.model_file or self.model_hf_repo or self.model_url)
        if is_router and not (self.models_dir or self.models_preset):
            self.models_preset = str(preset)
        # Only what would be downloaded is replaced: a test that names a local file keeps it
        # (the class-level Hugging Face defaults are dropped all the same).
        if self.model_hf_repo or self.model_hf_file or self.model_url:
            self.model_hf_repo = None
            self.model_hf_file = None
            self.model_url = None
            self.model_file = self.model_file or model
        original_start(self, *args, **kwargs)

    server_process.start = start
    utils.ServerPreset.load_all = staticmethod(lambda: None)


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Skip the tests in NEEDS_NETWORK: there is no network here."""
    for item in items:
        why = NEEDS_NETWORK.get(item.originalname)
        if why is not None:
            item.add_marker(pytest.mark.skip(reason=f"needs Hugging Face: {why}"))


#: nodeid -> passed | failed | skipped, for the runner (one pytest session per process).
_RESULTS: dict[str, str] = {}


def pytest_runtest_logreport(report: Any) -> None:
    """Each test's outcome: failed if any phase failed, skipped if one skipped, else passed."""
    previous = _RESULTS.get(report.nodeid)
    if report.failed:
        _RESULTS[report.nodeid] = "failed"
    elif report.skipped and previous != "failed":
        _RESULTS[report.nodeid] = "skipped"
    elif report.passed and previous is None:
        _RESULTS[report.nodeid] = "passed"
    if report.when == "teardown":
        _write()  # after every test: a run stopped by its deadline still reports what ran


def _write() -> None:
    target = os.environ.get("LLAMACTL_UPSTREAM_RESULTS")
    if target:
        with open(f"{target}.tmp", "w") as f:
            json.dump(_RESULTS, f, indent=1, sort_keys=True)
        os.replace(f"{target}.tmp", target)


def pytest_sessionfinish(session: Any) -> None:
    """Write the outcomes as JSON to LLAMACTL_UPSTREAM_RESULTS, when set."""
    _write()
