"""Declaring several models: router mode's flags, several -m, the INI presets and the TOML
file; a bad file refused with its file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.serve.args import parse_serve_args
from llamactl.serve.config import ConfigError, declare, parse_preset, scan_models_dir

pytestmark = pytest.mark.unit


def gguf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")
    return path


def test_router_flags_are_taken_with_their_meaning() -> None:
    spec = parse_serve_args(
        ["--models-dir", "/m", "--models-max", "2", "--no-models-autoload", "-c", "512"],
        environ={},
    )
    assert (spec.models_dir, spec.models_max, spec.models_autoload) == (Path("/m"), 2, False)
    assert spec.passthrough == ("-c", "512") and spec.many_models
    assert not parse_serve_args(["-m", "a.gguf"], environ={}).many_models
    two = parse_serve_args(["-m", "a.gguf", "-m", "b.gguf"], environ={})
    assert two.models == ("a.gguf", "b.gguf") and two.model == "a.gguf" and two.many_models
    env = parse_serve_args([], environ={"LLAMA_ARG_MODELS_DIR": "/e", "LLAMA_ARG_MODELS_MAX": "3"})
    assert (env.models_dir, env.models_max) == (Path("/e"), 3)
    assert parse_serve_args([], environ={}).models_max == 4  # llama-server's default


def test_models_dir_names_files_and_folders_as_router_mode_does(tmp_path: Path) -> None:
    gguf(tmp_path / "alpha.gguf")
    gguf(tmp_path / "big-00001-of-00002.gguf")
    gguf(tmp_path / "big-00002-of-00002.gguf")
    gguf(tmp_path / "vision" / "vision-Q4.gguf")
    gguf(tmp_path / "vision" / "mmproj-F16.gguf")
    (tmp_path / "notes.txt").write_text("x")
    found = {d.name: d for d in scan_models_dir(tmp_path)}
    assert sorted(found) == ["alpha", "big", "vision"]
    assert found["big"].source.endswith("big-00001-of-00002.gguf")
    assert found["vision"].args == ("--mmproj", str(tmp_path / "vision" / "mmproj-F16.gguf"))


def test_preset_ini_with_defaults_and_per_model_sections(tmp_path: Path) -> None:
    dirm = gguf(tmp_path / "d" / "alpha.gguf")
    other = gguf(tmp_path / "other.gguf")
    ini = tmp_path / "p.ini"
    ini.write_text(
        f"version = 1\n[*]\nc = 2048\nn-gpu-layers = 8\n\n[alpha]\nc = 1024\njinja = true\n"
        f"\n[custom]\nmodel = {other}\nload-on-startup = true\nflash-attn = false\n"
    )
    known = scan_models_dir(dirm.parent)
    found = {d.name: d for d in parse_preset(ini, known)}
    assert found["alpha"].args == ("-c", "2048", "--n-gpu-layers", "8", "-c", "1024", "--jinja")
    assert found["custom"].source == str(other) and found["custom"].load_on_startup
    assert "--flash-attn" not in found["custom"].args


def test_preset_section_without_a_model_says_where(tmp_path: Path) -> None:
    ini = tmp_path / "p.ini"
    ini.write_text("[*]\nc = 1\n\n[ghost]\nc = 2\n")
    with pytest.raises(ConfigError, match=r"p\.ini:4: \[ghost\]: .*model = PATH"):
        parse_preset(ini)


def test_preset_keys_named_by_environment_variable_become_that_models_environment(
    tmp_path: Path,
) -> None:
    dirm = gguf(tmp_path / "d" / "alpha.gguf")
    other = gguf(tmp_path / "other.gguf")
    ini = tmp_path / "p.ini"
    ini.write_text(
        "[*]\nLLAMA_ARG_N_PARALLEL = 2\nLLAMA_ARG_CTX_SIZE = 4096\n\n"
        f"[custom]\nLLAMA_ARG_MODEL = {other}\nLLAMA_ARG_CTX_SIZE = 512\n"
        "LLAMA_ARG_ALIAS = c1,c2\nc = 8\n"
    )
    found = {d.name: d for d in parse_preset(ini, scan_models_dir(dirm.parent))}
    custom = dict(found["custom"].env)
    # The model's own section wins over [*], as in router mode; flags stay flags.
    assert custom == {"LLAMA_ARG_N_PARALLEL": "2", "LLAMA_ARG_CTX_SIZE": "512"}
    assert found["custom"].source == str(other) and found["custom"].aliases == ("c1", "c2")
    assert found["custom"].args == ("-c", "8")
    # A --models-dir model with no section still gets [*]'s variables.
    assert dict(found["alpha"].env) == {"LLAMA_ARG_N_PARALLEL": "2", "LLAMA_ARG_CTX_SIZE": "4096"}


@pytest.mark.parametrize("key", ["LLAMA_ARG_PORT", "LLAMA_API_KEY", "LLAMA_ARG_SSL_KEY_FILE"])
def test_preset_environment_keys_that_llamactl_owns_are_refused(tmp_path: Path, key: str) -> None:
    other = gguf(tmp_path / "other.gguf")
    ini = tmp_path / "p.ini"
    ini.write_text(f"[m]\nmodel = {other}\n{key} = 1\n")
    with pytest.raises(ConfigError, match=rf"p\.ini:3: \[m\] {key}: llamactl sets {key} itself"):
        parse_preset(ini)


def test_toml_env_table_is_that_models_environment(tmp_path: Path) -> None:
    gguf(tmp_path / "a.gguf")
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        "[models.a]\nfile = 'a.gguf'\nenv = { LLAMA_ARG_CTX_SIZE = 512, LLAMA_ARG_JINJA = true }\n"
    )
    (a,) = declare(config=cfg).models
    assert dict(a.env) == {"LLAMA_ARG_CTX_SIZE": "512", "LLAMA_ARG_JINJA": "true"}
    cfg.write_text("[models.a]\nfile = 'a.gguf'\nenv = { LLAMA_ARG_HOST = '0.0.0.0' }\n")
    with pytest.raises(ConfigError, match=r":3: \[models\.a\] env: llamactl sets LLAMA_ARG_HOST"):
        declare(config=cfg)


def test_toml_declares_everything(tmp_path: Path) -> None:
    a = gguf(tmp_path / "a.gguf")
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        "[serve]\nmodels_max = 2\nargs = ['-c', '2048']\n\n"
        "[models.chat]\nfile = 'a.gguf'\naliases = ['c', 'talk']\nargs = ['-np', '2']\n"
        "ttl = 300\npinned = true\nreplicas = 2\ngroups = ['gpu']\n\n"
        "[models.remote]\npull = 'hf://org/repo:Q4_K_M'\n\n"
        "[groups.gpu]\nexclusive = true\n"
    )
    fleet = declare(config=cfg, common_args=("-t", "2"))
    chat = fleet.names()["talk"]
    assert chat.name == "chat" and chat.source == str(a.resolve())
    assert (chat.ttl, chat.pinned, chat.replicas, chat.groups) == (300.0, True, 2, ("gpu",))
    assert fleet.names()["remote"].is_pull
    assert fleet.models_max == 2 and fleet.exclusive_groups == {"gpu"}
    assert fleet.common_args == ("-c", "2048", "-t", "2")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "[models.a]\nfile = 'x.gguf'\nttl = 'soon'\n",
            r"serve\.toml:3: \[models\.a\] ttl: expected",
        ),
        ("[models.a]\nfile = 'x.gguf'\ncolour = 1\n", r":3: \[models\.a\] colour: unknown key"),
        ("[models.a]\nfile = 'x.gguf'\nreplicas = 0\n", r":3: \[models\.a\] replicas: must be"),
        ("[models.a]\nfile = 'x'\npull = 'hf://x'\n", r":1: \[models\.a\]: give exactly one"),
        ("[models.a]\nfile = 'x.gguf'\ngroups = ['g']\n", r":3: \[models\.a\] groups: no \[groups"),
        ("[models.a\nfile = 1\n", r"not valid TOML.*line 1"),
        ("[serve]\nmodels_max = true\n", r":2: \[serve\] models_max: expected int"),
        ("[model.a]\n", r"unknown table"),
    ],
)
def test_a_bad_toml_is_refused_with_file_line_and_key(
    tmp_path: Path, text: str, where: str
) -> None:
    gguf(tmp_path / "x.gguf")
    cfg = tmp_path / "serve.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=where):
        declare(config=cfg)


def test_missing_files_and_clashing_names_are_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "serve.toml"
    cfg.write_text("[models.a]\nfile = 'nope.gguf'\n")
    with pytest.raises(ConfigError, match="no such file"):
        declare(config=cfg)
    gguf(tmp_path / "x.gguf")
    cfg.write_text("[models.a]\nfile = 'x.gguf'\n[models.b]\nfile = 'x.gguf'\naliases = ['a']\n")
    with pytest.raises(ConfigError, match="already used by 'a'"):
        declare(config=cfg)


def test_several_m_named_as_llamactl_models_lists_them_and_alias_wins(tmp_path: Path) -> None:
    a = gguf(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")
    b = gguf(tmp_path / "b.gguf")
    fleet = declare(model_args=(str(a), str(b)))
    assert [d.name for d in fleet.models] == ["SmolLM2-135M-Instruct.Q4_1", "b"]
    one = declare(model_args=(str(a), str(a)), common_args=("--alias", "smol"))
    assert [d.name for d in one.models] == ["SmolLM2-135M-Instruct.Q4_1"]
    aliased = declare(model_args=(str(a),), models_dir=b.parent, common_args=("-a", "smol"))
    assert "smol" in aliased.names() and "--alias" not in aliased.common_args
