"""`llamactl serve`'s command line: a llama-server command line split into llamactl's part
(host, port, keys, model, llamactl's own options) and the flags passed on to llama-server.

Pure: no event loop, no process; serve imports it before llama-server is spawned."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamactl.errors import UsageError
from llamactl.serve.listen import parse_mode, split_hosts

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY = 64 * 1024 * 1024

#: llamactl's own options. None of these names is a llama-server flag (checked against the
#: vendored common/arg.cpp by tests/test_serve_args.py), so no llama-server flag is shadowed.
OWN_OPTIONS = {
    "--server-bin": "Use this llama-server binary instead of llamactl's build.",
    "--backend": "Use (and if needed build) this backend's build: cpu, cuda, hip, ...; with "
    "--server-bin: what that binary was built for.",
    "--queue-timeout": "Seconds a request waits for a starting model before 503 (default 120).",
    "--start-timeout": "Seconds of no loading progress before a start fails (default 120).",
    "--max-body-size": "Largest request body accepted, e.g. 64M (default 64M); larger: 413.",
    "--socket-mode": "Permissions of a Unix socket (--host PATH.sock), octal (default 0600).",
    "--allowed-hosts": "More Host names accepted without an API key, comma-separated; * = any.",
    "--max-connections": "Client connections at once; more get 503 (default: from the fd limit).",
    "--remote": "URL of another llamactl serve or llama-server to use as a replica "
    "(repeatable; key from LLAMACTL_REMOTE_API_KEY; with no -m, no local model).",
    "--config": "A TOML file declaring models (default: serve.toml in the config directory).",
}
#: llama-server flags that llamactl takes for the proxy instead of passing them on; the
#: router-mode ones keep their meaning, but llamactl routes itself (serve/fleet.py).
TAKEN_FLAGS = (
    "--host",
    "--port",
    "--reuse-port",
    "--ssl-key-file",
    "--ssl-cert-file",
    "--api-key",
    "--api-key-file",
    "-m",
    "--model",
    "--log-disable",
    "--models-dir",
    "--models-preset",
    "--models-max",
    "--models-autoload",
    "--no-models-autoload",
)
#: llama-server's default for --models-max (common/common.h).
DEFAULT_MODELS_MAX = 4
#: llama-server flags that cannot work behind the proxy, with the reason.
REFUSED_FLAGS: dict[str, str] = {}
_NO_VALUE = frozenset({"-h", "--help"})


@dataclass(frozen=True)
class ServeSpec:
    """Everything `serve` was asked to do."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys: tuple[str, ...] = ()
    model: str | None = None  # the first -m
    models: tuple[str, ...] = ()  # every -m, in order
    models_dir: Path | None = None
    models_preset: Path | None = None
    models_max: int = DEFAULT_MODELS_MAX
    models_autoload: bool = True
    config: Path | None = None
    passthrough: tuple[str, ...] = ()  # llama-server flags, in the user's order
    server_bin: Path | None = None
    backend: str | None = None
    queue_timeout: float = 120.0
    start_timeout: float = 120.0
    max_body_bytes: int = DEFAULT_MAX_BODY
    show_help: bool = False
    reuse_port: bool = False
    ssl_key_file: str | None = None
    ssl_cert_file: str | None = None
    socket_mode: int = 0o600
    allowed_hosts: tuple[str, ...] = ()
    max_connections: int | None = None  # None: sized from RLIMIT_NOFILE
    #: Copy llama-server's output to serve's stderr (off with --log-disable; the log file
    #: keeps it either way, for `llamactl logs` and for the diagnosis of a failed start).
    log_to_stderr: bool = True
    remotes: tuple[str, ...] = ()  # --remote URLs, in order
    env_overrides: dict[str, str] = field(default_factory=dict)

    @property
    def many_models(self) -> bool:
        """Whether llamactl routes between several models (router mode's flags, several -m,
        a config file) rather than serving one llama-server for every name."""
        return bool(self.models_dir or self.models_preset or self.config or len(self.models) > 1)

    @property
    def has_model_source(self) -> bool:
        from llamactl.serve.server import MODEL_SOURCE_FLAGS

        return (
            self.model is not None
            or self.many_models
            or any(a.split("=", 1)[0] in MODEL_SOURCE_FLAGS for a in self.passthrough)
        )


def parse_size(text: str) -> int:
    """'64M' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not m:
        raise UsageError(f"not a size: {text!r} (examples: 1048576, 512K, 64M, 1G)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _read_key_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read --api-key-file {path}: {exc.strerror}") from exc
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def parse_serve_args(argv: list[str], environ: dict[str, str] | None = None) -> ServeSpec:
    """Split a llama-server command line into llamactl's part and llama-server's part.

    Pure: no file is touched but an --api-key-file. Flags llamactl does not know are passed
    on unchanged and in order, so `llama-server ARGS` and `llamactl serve ARGS` agree."""
    env = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    keys: list[str] = []
    remotes: list[str] = []
    allowed: list[str] = []
    models: list[str] = []
    passthrough: list[str] = []
    i = 0

    def take(flag: str, inline: str | None) -> str:
        nonlocal i
        if inline is not None:
            return inline
        if i + 1 >= len(argv):
            raise UsageError(f"{flag} needs a value")
        i += 1
        return argv[i]

    while i < len(argv):
        arg = argv[i]
        flag, eq, inline_value = arg.partition("=")
        inline = inline_value if eq and flag.startswith("--") else None
        if not (eq and flag.startswith("--")):
            flag = arg
        if flag in _NO_VALUE:
            values["show_help"] = True
        elif flag in REFUSED_FLAGS:
            raise UsageError(f"{flag}: {REFUSED_FLAGS[flag]}")
        elif flag == "--host":
            values["host"] = take(flag, inline)
            if not split_hosts(values["host"]):
                raise UsageError("--host requires at least one address")
        elif flag == "--reuse-port":
            values["reuse_port"] = True
        elif flag in ("--ssl-key-file", "--ssl-cert-file"):
            values[flag[2:].replace("-", "_")] = take(flag, inline)
        elif flag == "--log-disable":
            values["log_to_stderr"] = False
        elif flag == "--socket-mode":
            raw = take(flag, inline)
            try:
                values["socket_mode"] = parse_mode(raw)
            except ValueError:
                raise UsageError(
                    f"--socket-mode takes an octal mode such as 0660, not {raw!r}"
                ) from None
        elif flag == "--max-connections":
            raw = take(flag, inline)
            if not raw.isdigit() or int(raw) < 1:
                raise UsageError(f"--max-connections takes a positive number, not {raw!r}")
            values["max_connections"] = int(raw)
        elif flag == "--allowed-hosts":
            allowed.extend(h.strip().lower() for h in take(flag, inline).split(",") if h.strip())
        elif flag == "--port":
            raw = take(flag, inline)
            # 0: a port the system picks, as llama-server takes it (shown in "listening at").
            if not raw.isdigit() or not 0 <= int(raw) < 65536:
                raise UsageError(f"--port must be a number from 0 to 65535, not {raw!r}")
            values["port"] = int(raw)
        elif flag == "--api-key":
            keys.extend(k for k in take(flag, inline).split(",") if k)
        elif flag == "--api-key-file":
            keys.extend(_read_key_file(take(flag, inline)))
        elif flag in ("-m", "--model"):
            models.append(take(flag, inline))
        elif flag == "--models-dir":
            values["models_dir"] = Path(take(flag, inline)).expanduser()
        elif flag == "--models-preset":
            values["models_preset"] = Path(take(flag, inline)).expanduser()
        elif flag == "--config":
            values["config"] = Path(take(flag, inline)).expanduser()
        elif flag == "--models-max":
            raw = take(flag, inline)
            if not raw.isdigit():
                raise UsageError(f"--models-max takes a number (0 = unlimited), not {raw!r}")
            values["models_max"] = int(raw)
        elif flag in ("--models-autoload", "--no-models-autoload"):
            values["models_autoload"] = flag == "--models-autoload"
        elif flag == "--server-bin":
            values["server_bin"] = Path(take(flag, inline)).expanduser()
        elif flag == "--backend":
            values["backend"] = take(flag, inline)
        elif flag in ("--queue-timeout", "--start-timeout"):
            raw = take(flag, inline)
            try:
                seconds = float(raw)
            except ValueError:
                raise UsageError(f"{flag} takes seconds, not {raw!r}") from None
            if seconds <= 0:
                raise UsageError(f"{flag} must be positive")
            values[flag[2:].replace("-", "_")] = seconds
        elif flag == "--max-body-size":
            values["max_body_bytes"] = parse_size(take(flag, inline))
        elif flag == "--remote":
            remotes.append(take(flag, inline))
        else:
            passthrough.append(arg)
        i += 1

    if models:
        values["model"] = models[0]
        values["models"] = tuple(models)
    # llama-server reads these from the environment too; keep that working.
    if "models_dir" not in values and env.get("LLAMA_ARG_MODELS_DIR"):
        values["models_dir"] = Path(env["LLAMA_ARG_MODELS_DIR"]).expanduser()
    if "models_preset" not in values and env.get("LLAMA_ARG_MODELS_PRESET"):
        values["models_preset"] = Path(env["LLAMA_ARG_MODELS_PRESET"]).expanduser()
    if "models_max" not in values and env.get("LLAMA_ARG_MODELS_MAX", "").isdigit():
        values["models_max"] = int(env["LLAMA_ARG_MODELS_MAX"])
    if "models_autoload" not in values and env.get("LLAMA_ARG_MODELS_AUTOLOAD"):
        values["models_autoload"] = env["LLAMA_ARG_MODELS_AUTOLOAD"].lower() in (
            "1",
            "true",
            "on",
            "enabled",
        )
    if "host" not in values and env.get("LLAMA_ARG_HOST"):
        values["host"] = env["LLAMA_ARG_HOST"]
    if "port" not in values and env.get("LLAMA_ARG_PORT", "").isdigit():
        values["port"] = int(env["LLAMA_ARG_PORT"])
    for name in ("ssl_key_file", "ssl_cert_file"):
        if name not in values and env.get(f"LLAMA_ARG_{name.upper()}"):
            values[name] = env[f"LLAMA_ARG_{name.upper()}"]
    if "reuse_port" not in values and env.get("LLAMA_ARG_REUSE_PORT", "") not in ("", "0"):
        values["reuse_port"] = True
    if bool(values.get("ssl_key_file")) != bool(values.get("ssl_cert_file")):
        # llama-server silently serves plain HTTP when only one is given: a user who asked
        # for TLS would send secrets in the clear.
        raise UsageError("TLS needs both --ssl-key-file and --ssl-cert-file")
    if not keys:
        for name in ("LLAMACTL_API_KEY", "LLAMA_API_KEY"):
            if env.get(name):
                keys.extend(k for k in env[name].split(",") if k)
                break
    return ServeSpec(
        api_keys=tuple(keys),
        allowed_hosts=tuple(allowed),
        passthrough=tuple(passthrough),
        remotes=tuple(remotes),
        **values,
    )


HELP = """Usage: llamactl serve [-m MODEL] [--host HOST] [--port PORT] [--api-key KEY]
                      [LLAMACTL OPTIONS] [ANY llama-server FLAG ...]

  Serve a model through a supervised llama-server behind llamactl's proxy:
  the OpenAI-compatible API, streaming and the web UI at http://HOST:PORT.
  With no -m, serves the default model (SmolLM2-135M-Instruct), fetched once.

  Taken by llamactl (same meaning as in llama-server):
    -m, --model PATH|NAME   a GGUF file, or a model name (see `llamactl models`);
                            several -m serve several models, routed by `model`
    --host HOST[,HOST]      addresses to listen on (default 127.0.0.1): IPv4, IPv6, names,
                            or a Unix socket path ending in .sock
    --port PORT             port to listen on (default 8080)
    --reuse-port            let other sockets bind the same port (SO_REUSEPORT)
    --ssl-key-file FILE     with --ssl-cert-file: serve HTTPS (PEM files)
    --ssl-cert-file FILE    (llama-server behind stays plain HTTP on loopback)
    --api-key KEY[,KEY]     required from clients (env LLAMACTL_API_KEY); /health stays open
    --api-key-file FILE     keys, one per line
    --log-disable           do not copy llama-server's output to stderr (the log file
                            keeps it: `llamactl logs`)
    --models-dir DIR        serve every .gguf in DIR, loaded on demand (router mode's flag;
                            llamactl routes itself: one llama-server per loaded model)
    --models-preset FILE    router mode's INI presets ([*] defaults, [name] per model)
    --models-max N          at most N models loaded at once, least recently used evicted
                            (default 4, 0 = unlimited)
    --no-models-autoload    load models only through POST /models/load or `llamactl load`

  llamactl's own:
{own}

  Every other flag goes to llama-server unchanged (-ngl, -c, --alias, -t, -v,
  --log-file, --log-colors, ...): see `$(llamactl which) --help`.
  llama-server's output is copied to stderr as it prints it, and kept in a log file
  (`llamactl logs`); serve's own lines start with "llamactl:".
"""


def help_text() -> str:
    own = "\n".join(f"    {name:<22}  {text}" for name, text in OWN_OPTIONS.items())
    return HELP.format(own=own)
