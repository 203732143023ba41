"""serve's command line: llamactl's part and llama-server's part, split without loss."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llamactl.build.source import default_tree_path
from llamactl.errors import UsageError
from llamactl.serve.args import OWN_OPTIONS, ServeSpec, parse_serve_args, parse_size

pytestmark = pytest.mark.unit

pytestmark = pytest.mark.unit


def test_defaults_match_llama_server() -> None:
    spec = parse_serve_args([], environ={})
    assert (spec.host, spec.port, spec.api_keys, spec.model) == ("127.0.0.1", 8080, (), None)
    assert spec.passthrough == ()
    assert not spec.has_model_source


def test_seed_command_line_splits_and_keeps_order() -> None:
    argv = ["-m", "model.gguf", "-ngl", "999", "--port", "9000", "-c", "4096", "--alias", "m"]
    spec = parse_serve_args(argv, environ={})
    assert spec.model == "model.gguf"
    assert spec.port == 9000
    # -ngl 999 must survive as two words, in order: click's option parser would mangle -ngl.
    assert spec.passthrough == ("-ngl", "999", "-c", "4096", "--alias", "m")


def test_equals_forms_and_key_sources(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# comment\nk2\n\nk3\n")
    spec = parse_serve_args(
        ["--host=0.0.0.0", "--port=81", "--api-key=k1", "--api-key-file", str(keys)], environ={}
    )
    assert spec.host == "0.0.0.0" and spec.port == 81
    assert spec.api_keys == ("k1", "k2", "k3")


def test_comma_separated_keys_like_llama_server() -> None:
    assert parse_serve_args(["--api-key", "a,b"], environ={}).api_keys == ("a", "b")


def test_environment_like_llama_server() -> None:
    env = {"LLAMA_ARG_HOST": "0.0.0.0", "LLAMA_ARG_PORT": "9100", "LLAMA_API_KEY": "e"}
    spec = parse_serve_args([], environ=env)
    assert (spec.host, spec.port, spec.api_keys) == ("0.0.0.0", 9100, ("e",))
    # The command line wins over the environment.
    assert parse_serve_args(["--port", "1"], environ=env).port == 1


def test_llamactl_key_env_wins_over_llama_server_env() -> None:
    env = {"LLAMACTL_API_KEY": "mine", "LLAMA_API_KEY": "theirs"}
    assert parse_serve_args([], environ=env).api_keys == ("mine",)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port"], "needs a value"),
        (["--port", "http"], "--port must be a number"),
        (["--port", "70000"], "--port must be a number"),
        (["--queue-timeout", "soon"], "takes seconds"),
        (["--start-timeout", "-1"], "must be positive"),
        (["--max-body-size", "lots"], "not a size"),
        (["--ssl-key-file", "k.pem"], "TLS needs both --ssl-key-file and --ssl-cert-file"),
        (["--host", " , "], "--host requires at least one address"),
        (["--socket-mode", "rw"], "--socket-mode takes an octal mode"),
        (["--api-key-file", "/nonexistent/keys"], "cannot read --api-key-file"),
    ],
)
def test_bad_input_is_a_usage_error(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_serve_args(argv, environ={})


def test_model_source_flags_suppress_the_default_model() -> None:
    for argv in (["-hf", "org/repo"], ["--models-dir", "/m"], ["--hf-repo=org/r"]):
        assert parse_serve_args(argv, environ={}).has_model_source, argv
    assert not parse_serve_args(["-ngl", "99"], environ={}).has_model_source


def test_own_options() -> None:
    spec = parse_serve_args(
        ["--server-bin", "/x/llama-server", "--queue-timeout", "5", "--max-body-size", "2M"],
        environ={},
    )
    assert spec == ServeSpec(
        server_bin=Path("/x/llama-server"), queue_timeout=5.0, max_body_bytes=2 << 20
    )


@pytest.mark.parametrize(
    "text, value", [("100", 100), ("512K", 512 << 10), ("64M", 64 << 20), ("1GiB", 1 << 30)]
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_own_options_shadow_no_llama_server_flag() -> None:
    """Every llama-server flag must reach llama-server: llamactl's own names must not be
    llama-server's (read from the vendored common/arg.cpp)."""
    arg_cpp = default_tree_path() / "common" / "arg.cpp"
    if not arg_cpp.is_file():
        pytest.skip("llama.cpp source not fetched")
    flags = set(re.findall(r'"(--?[a-zA-Z][\w-]*)"', arg_cpp.read_text()))
    assert "--n-gpu-layers" in flags  # the reader works
    assert not (set(OWN_OPTIONS) & flags)
