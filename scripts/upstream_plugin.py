"""A pytest plugin for llama.cpp's own server tests (tools/server/tests) on a machine that cannot
reach Hugging Face: every server the tests start gets a local model file instead of the
preset's Hugging Face repository, file or URL, and the session's model pre-download
(`ServerPreset.load_all`) does nothing.

Load it with `-p upstream_plugin` (this folder on PYTHONPATH) and name the model in
LLAMACTL_UPSTREAM_MODEL. scripts/upstream_server_tests.py does both."""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any


def _local_model() -> str:
    model = os.environ.get("LLAMACTL_UPSTREAM_MODEL", "")
    if not model or not os.path.isfile(model):
        raise SystemExit(f"upstream_plugin: LLAMACTL_UPSTREAM_MODEL={model!r} is not a file")
    return model


def pytest_configure(config: Any) -> None:
    """Patch upstream's utils before the first test: its conftest imported it already."""
    model = _local_model()
    utils = sys.modules.get("utils") or importlib.import_module("utils")
    server_process = utils.ServerProcess
    original_start = server_process.start

    def start(self: Any, *args: Any, **kwargs: Any) -> None:
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
