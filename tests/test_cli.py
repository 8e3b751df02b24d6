"""parca-agent's flags: names, defaults, precedence, refusals, and the README's copy of --help."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from services import settings as s
from tests.helpers.services import PYTHON, ROOT


def run_cli(*args: str, env: dict | None = None, timeout: float = 30):
    base = {k: v for k, v in os.environ.items() if not k.startswith("PARCA_AGENT_")}
    base.update(env or {})
    base["COLUMNS"] = "100"
    return subprocess.run([PYTHON, "-m", "services.cli", *args], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=timeout)


def test_the_go_agents_flags_and_defaults():
    st = s.resolve(s.build_parser().parse_args([]), environ={})
    assert st.log_level == "info"
    assert st.http_address == ("", 8080)
    assert st.node == os.uname().nodename
    assert st.store_address == "" and st.bearer_token == "" and st.bearer_token_file == ""
    assert st.insecure is False and st.insecure_skip_verify is False
    assert st.sampling_ratio == 1.0 and st.kubernetes is True
    assert st.pod_label_selector == "" and st.systemd_units == ()
    assert st.profiling_duration == 10.0 and st.sampling_frequency == 100


def test_flag_beats_environment_beats_default():
    env = {"PARCA_AGENT_STORE_ADDRESS": "env:1", "PARCA_AGENT_KUBERNETES": "false",
           "PARCA_AGENT_SYSTEMD_UNITS": "a.service,b.service"}
    st = s.resolve(s.build_parser().parse_args(["--store-address", "flag:2"]), environ=env)
    assert st.store_address == "flag:2"
    assert st.kubernetes is False
    assert st.systemd_units == ("a.service", "b.service")
    st = s.resolve(s.build_parser().parse_args(["--kubernetes"]), environ=env)
    assert st.kubernetes is True  # a bare boolean flag means true, over the environment


def test_every_flag_has_its_environment_variable():
    for flag in s.FLAGS:
        assert flag.env == "PARCA_AGENT_" + flag.name.replace("-", "_").upper()


def test_settings_survive_the_trip_through_the_environment(tmp_path):
    token = tmp_path / "token"
    token.write_text("t0k3n")
    argv = ["--http-address", "[::1]:9000", "--systemd-units", "x.service",
            "--profiling-duration", "1.5s", "--bearer-token-file", str(token), "--insecure",
            "--sampling-ratio", "0.25", "--store-address", "store:7070"]
    first = s.resolve(s.build_parser().parse_args(argv), environ={})
    again = s.resolve(s.build_parser().parse_args([]), environ=first.to_environment())
    assert again == first


@pytest.mark.parametrize("args, flag", [
    (["--sampling-ratio", "1.5"], "--sampling-ratio"),
    (["--sampling-ratio", "-0.1"], "--sampling-ratio"),
    (["--bearer-token", "a", "--bearer-token-file", "/etc/hostname"], "--bearer-token"),
    (["--bearer-token-file", "/nonexistent/token"], "--bearer-token-file"),
    (["--store-address", "no port here"], "--store-address"),
    (["--http-address", "localhost"], "--http-address"),
    (["--profiling-duration", "ten"], "--profiling-duration"),
    (["--kubernetes", "maybe"], "--kubernetes"),
    (["--log-level", "loud"], "--log-level"),
    (["--sampling-frequency", "0"], "--sampling-frequency"),
])
def test_bad_values_exit_2_with_one_line_naming_the_flag(args, flag, tmp_path):
    r = run_cli(*args, "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], r.stderr
    assert not (tmp_path / "run").exists(), "nothing may start on a bad flag"


def test_bad_environment_value_names_variable_and_flag():
    r = run_cli(env={"PARCA_AGENT_SAMPLING_RATIO": "2"})
    assert r.returncode == 2
    assert "PARCA_AGENT_SAMPLING_RATIO" in r.stderr and "--sampling-ratio" in r.stderr


def test_readme_lists_the_flags_exactly_as_help_prints_them():
    help_text = run_cli("--help").stdout
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- flags:begin -->\n```\n(.*?)```\n<!-- flags:end -->", readme, re.S)
    assert m, "README.md lacks the flags block"
    assert m.group(1) == help_text, "README.md's flags differ from --help: run make readme-flags"


def test_a_token_file_the_agent_user_cannot_read_is_refused_before_start(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("parca-agent itself refuses to start without root")
    token = tmp_path / "token"  # pytest's tmp folders are private to root
    token.write_text("t")
    r = run_cli("--bearer-token-file", str(token), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--bearer-token-file" in lines[0] and "parca-agent user" in lines[0]
    assert not (tmp_path / "run").exists()
