"""parca-agent: validate the flags, then run every service under supervisord in the foreground.

``parca-agent tap`` is the reference subscriber of the raw sample stream (see services/tap.py).
Settings reach the services through the environment (``PARCA_AGENT_*``), which supervisord passes
on to its children, so a service reads exactly what this command validated.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from services import parent_death
from services.settings import Settings, SettingsError, build_parser, resolve

ROOT = Path(__file__).resolve().parent.parent
SUPERVISORD_CONF = ROOT / "deploy" / "supervisord.conf"
DESCRIPTION = """\
An eBPF sampling profiler for Linux hosts and Kubernetes nodes, compatible with Parca Agent.
Samples every CPU's user and kernel stacks, builds one pprof profile per target and window,
serves a web UI and ships profiles to a Parca (or Conprof) store.

Subcommands:
  parca-agent tap [--format=json|folded]   print the raw sample stream
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "tap":
        from services.tap import main as tap_main

        return tap_main(argv[1:])
    parser = build_parser("parca-agent", DESCRIPTION)
    namespace = parser.parse_args(argv)
    try:
        settings = resolve(namespace)
    except SettingsError as e:
        print(f"parca-agent: {e}", file=sys.stderr)
        return 2
    return run_supervised(settings)


def prepare_directories(settings: Settings) -> None:
    """Run directory root:parca-agent 2770 (setgid: sockets join the group), cache dirs alike."""
    try:
        gid = grp.getgrnam(settings.user).gr_gid
    except KeyError:
        gid = -1
    for path in (settings.run_dir, settings.cache_dir):
        os.makedirs(path, exist_ok=True)
        if os.geteuid() == 0 and gid >= 0:
            os.chown(path, 0, gid)
            os.chmod(path, 0o2770)


def readable_as(user: str, path: str) -> bool:
    """Whether ``user`` can open ``path``: asked in a child that becomes that user."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return True  # no such user: the services run as root, which was checked already
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            with open(path, "rb"):
                pass
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def check_for_services(settings: Settings) -> str | None:
    """Problems only visible once the services run as their user; one line, or None."""
    code = str(ROOT / "services" / "__init__.py")
    if not readable_as(settings.user, code) or not readable_as(settings.user, sys.executable):
        return (f"the agent at {ROOT} (and {sys.executable}) must be readable by the "
                f"{settings.user} user the unprivileged services run as: install it in a folder "
                "others may enter, such as /opt or /srv")
    if settings.bearer_token_file and not readable_as(settings.user, settings.bearer_token_file):
        return (f"invalid --bearer-token-file: {settings.bearer_token_file!r} is not readable by "
                f"the {settings.user} user the shipper runs as (chgrp {settings.user} it, "
                "chmod g+r, and let the group through its folders)")
    return None


def run_supervised(settings: Settings) -> int:
    if os.geteuid() != 0:
        print("parca-agent: must run as root: the collector loads BPF programs "
              "(the other services drop to the unprivileged user)", file=sys.stderr)
        return 1
    problem = check_for_services(settings)
    if problem:
        print(f"parca-agent: {problem}", file=sys.stderr)
        return 2
    prepare_directories(settings)
    env = dict(os.environ)
    env.update(settings.to_environment())
    env["PARCA_AGENT_PYTHON"] = sys.executable
    env["PARCA_AGENT_ROOT"] = str(ROOT)
    env["PARCA_AGENT_SUPERVISOR_SOCKET"] = os.path.join(settings.run_dir, "supervisor.sock")
    supervisord = shutil.which("supervisord", path=os.path.dirname(sys.executable)) or "supervisord"
    # supervisord (root, no change of credentials on exec) is told of our death too: a
    # SIGKILLed parca-agent must not leave it and the services running on.
    me = os.getpid()

    def die_with_us() -> None:
        parent_death.ask(signal.SIGTERM)
        if os.getppid() != me:  # we died between the fork and the request
            os._exit(1)

    proc = subprocess.Popen([supervisord, "--nodaemon", "--configuration", str(SUPERVISORD_CONF)],
                            env=env, preexec_fn=die_with_us)

    def forward(signum, _frame):
        proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = proc.wait()
    for leftover in ("supervisor.sock", "supervisord.pid"):
        try:
            os.unlink(os.path.join(settings.run_dir, leftover))
        except FileNotFoundError:
            pass
    return code


if __name__ == "__main__":
    sys.exit(main())
