"""Flags, environment and defaults, into one typed Settings object every service reads.

Precedence: command-line flag, then the environment variable named after the flag
(``--store-address`` -> ``PARCA_AGENT_STORE_ADDRESS``; booleans ``true``/``false``), then the
default. ``parca-agent`` validates and exports every value to its services' environment, so a
service started by supervisord sees exactly what the user gave.

A bad value raises SettingsError with one line that names the flag; callers exit 2.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from dataclasses import dataclass, fields
from typing import Any, Callable

ENV_PREFIX = "PARCA_AGENT_"


class SettingsError(Exception):
    """One line naming the flag and what is wrong with its value."""


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go-style durations (``10s``, ``500ms``, ``1m``) into seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration such as 10s or 500ms")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r} must be more than zero")
    return seconds


def parse_host_port(text: str) -> tuple[str, int]:
    """``host:port``, ``:port`` (all interfaces) or ``[v6]:port``."""
    text = text.strip()
    m = re.match(r"^(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]]*)):(\d{1,5})$", text)
    if not m:
        raise ValueError(f"{text!r} is not host:port")
    host = m.group(1) or m.group(2) or ""
    port = int(m.group(3))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    if host and not re.match(r"^[A-Za-z0-9.\-:]+$", host):
        raise ValueError(f"{host!r} is not a host name or address")
    return host, port


def parse_ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{text} is outside [0, 1]")
    return value


def parse_units(text: str) -> tuple[str, ...]:
    units = tuple(u.strip() for u in text.split(",") if u.strip())
    for u in units:
        if not re.match(r"^[A-Za-z0-9:_.\\@-]+$", u):
            raise ValueError(f"{u!r} is not a systemd unit name")
    return units


def parse_positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"{text} must be more than zero")
    return value


def parse_frequency(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 10000:
        raise ValueError(f"{text} must be between 1 and 10000 Hz")
    return value


def parse_log_level(text: str) -> str:
    value = text.strip().lower()
    if value not in ("debug", "info", "warn", "warning", "error"):
        raise ValueError(f"{text!r} is not one of debug, info, warn, error")
    return "warning" if value == "warn" else value


def parse_store_protocol(text: str) -> str:
    value = text.strip().lower()
    if value not in ("parca", "conprof"):
        raise ValueError(f"{text!r} is not parca or conprof")
    return value


def _text(text: str) -> str:
    return text


@dataclass(frozen=True)
class Flag:
    name: str  # the flag without dashes
    default: str  # as text, parsed like a user's value
    parse: Callable[[str], Any]
    help: str
    is_bool: bool = False

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.attr.upper()


FLAGS: tuple[Flag, ...] = (
    # The Go Parca Agent's flags, same names and defaults.
    Flag("log-level", "info", parse_log_level, "Log level: debug, info, warn or error."),
    Flag("http-address", ":8080", parse_host_port, "Address the web UI and /metrics listen on."),
    Flag("node", "", _text, "Name of the node this agent runs on (default: this host's name)."),
    Flag("store-address", "", _text,
         "gRPC address of the Parca (or Conprof) store to send profiles to; empty keeps them local."),
    Flag("bearer-token", "", _text, "Bearer token to authenticate with the store."),
    Flag("bearer-token-file", "", _text,
         "File to read the bearer token from; re-read when it changes."),
    Flag("insecure", "false", parse_bool, "Send to the store in plaintext, without TLS.",
         is_bool=True),
    Flag("insecure-skip-verify", "false", parse_bool,
         "Use TLS but do not verify the store's certificate.", is_bool=True),
    Flag("sampling-ratio", "1.0", parse_ratio,
         "Share of targets to profile, chosen by a stable hash: 0 profiles none, 1 all."),
    Flag("kubernetes", "true", parse_bool,
         "Discover containers of the pods on this node from the Kubernetes API.", is_bool=True),
    Flag("pod-label-selector", "", _text,
         "Label selector that chooses which pods on this node to profile."),
    Flag("systemd-units", "", parse_units, "Comma-separated systemd units to profile."),
    # This project's own.
    Flag("profiling-duration", "10s", parse_duration,
         "Length of one profile: samples are grouped into windows of this duration."),
    Flag("sampling-frequency", "100", parse_frequency,
         "Stack samples per second on each CPU."),
    Flag("dwarf-unwind", "true", parse_bool,
         "Walk native stacks without frame pointers in BPF, with unwind tables built from "
         ".eh_frame (x86_64; frame pointers only when off or when the kernel refuses it).",
         is_bool=True),
    Flag("host-processes", "false", parse_bool,
         "Also profile every host process as its own target when Kubernetes or systemd "
         "discovery is active (always on when neither is).", is_bool=True),
    Flag("kubeconfig", "", _text,
         "Kubeconfig file to reach the Kubernetes API from outside a cluster."),
    Flag("store-protocol", "parca", parse_store_protocol,
         "Store API to write with: parca (ProfileStoreService/WriteRaw) or conprof."),
    Flag("debuginfo-upload", "true", parse_bool,
         "Upload binaries' debug information to the store's debuginfo service.", is_bool=True),
    Flag("run-dir", "/run/parca-agent", _text,
         "Directory of the services' ZeroMQ socket files."),
    Flag("cache-dir", "/var/cache/parca-agent", _text,
         "Directory of the binary cache and the shipper's spool."),
    Flag("tap-address", "", _text,
         "Also publish the raw sample stream on this TCP host:port (off when empty)."),
    Flag("spool-max-bytes", "268435456", parse_positive_int,
         "Most bytes of profiles the shipper keeps on disk while the store is unreachable."),
    Flag("binary-cache-max-bytes", "1073741824", parse_positive_int,
         "Most bytes of binaries the collector keeps in the cache for symbolization."),
    Flag("proc-path", "/proc", _text, "Where procfs is mounted (a host's /proc in a container)."),
    Flag("cgroup-path", "/sys/fs/cgroup", _text, "Where the cgroup file systems are mounted."),
    Flag("user", "parca-agent", _text,
         "System user the unprivileged services run as under supervisord."),
)

FLAGS_BY_ATTR = {f.attr: f for f in FLAGS}


@dataclass(frozen=True)
class Settings:
    log_level: str
    http_address: tuple[str, int]
    node: str
    store_address: str
    bearer_token: str
    bearer_token_file: str
    insecure: bool
    insecure_skip_verify: bool
    sampling_ratio: float
    kubernetes: bool
    pod_label_selector: str
    systemd_units: tuple[str, ...]
    profiling_duration: float
    sampling_frequency: int
    dwarf_unwind: bool
    host_processes: bool
    kubeconfig: str
    store_protocol: str
    debuginfo_upload: bool
    run_dir: str
    cache_dir: str
    tap_address: str
    spool_max_bytes: int
    binary_cache_max_bytes: int
    proc_path: str
    cgroup_path: str
    user: str

    def to_environment(self) -> dict[str, str]:
        """Every setting as the environment variable a service reads it back from."""
        env = {}
        for f in FLAGS:
            value = getattr(self, f.attr)
            if f.is_bool:
                text = "true" if value else "false"
            elif f.name == "http-address":
                host, port = value
                text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            elif f.name == "systemd-units":
                text = ",".join(value)
            elif f.name == "profiling-duration":
                text = f"{int(value * 1000)}ms"
            else:
                text = str(value)
            env[f.env] = text
        return env


def build_parser(prog: str = "parca-agent", description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in FLAGS:
        help_text = f"{f.help} (env {f.env}; default {f.default!r})"
        if f.is_bool:
            parser.add_argument("--" + f.name, dest=f.attr, nargs="?", const="true", default=None,
                                metavar="true|false", help=help_text)
        else:
            parser.add_argument("--" + f.name, dest=f.attr, default=None, metavar="VALUE",
                                help=help_text)
    return parser


def resolve(namespace: argparse.Namespace | None, environ: dict[str, str] | None = None,
            check_files: bool = True) -> Settings:
    """Flag, then environment, then default; every value parsed and checked.

    ``check_files``: also check that files named by flags can be read. parca-agent does (as
    root, before anything starts); a service does not, since it runs as another user and only
    the shipper reads the token file, reporting its own errors."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in FLAGS:
        given = getattr(namespace, f.attr, None) if namespace is not None else None
        source = f"--{f.name}"
        if given is None and f.env in environ:
            given, source = environ[f.env], f"{f.env} (for --{f.name})"
        text = f.default if given is None else given
        try:
            values[f.attr] = f.parse(text)
        except ValueError as e:
            raise SettingsError(f"invalid {source}: {e}") from None
    if not values["node"]:
        values["node"] = socket.gethostname()
    settings = Settings(**values)
    _check_together(settings, check_files)
    return settings


def _check_together(s: Settings, check_files: bool) -> None:
    if s.bearer_token and s.bearer_token_file:
        raise SettingsError("--bearer-token and --bearer-token-file exclude each other: give one")
    if s.bearer_token_file and check_files:
        try:
            with open(s.bearer_token_file, "rb") as fh:
                fh.read(1)
        except OSError as e:
            raise SettingsError(f"invalid --bearer-token-file: cannot read "
                                f"{s.bearer_token_file!r}: {e.strerror}") from None
    if s.store_address:
        try:
            parse_host_port(s.store_address)
        except ValueError as e:
            raise SettingsError(f"invalid --store-address: {e}") from None
    if s.tap_address:
        try:
            parse_host_port(s.tap_address)
        except ValueError as e:
            raise SettingsError(f"invalid --tap-address: {e}") from None


def load(argv: list[str] | None = None, prog: str = "parca-agent",
         check_files: bool = True) -> Settings:
    """Parse argv (or sys.argv) and the environment; raise SettingsError on a bad value."""
    parser = build_parser(prog)
    namespace = parser.parse_args(argv)
    return resolve(namespace, check_files=check_files)


def field_names() -> list[str]:
    return [f.name for f in fields(Settings)]
