"""The three ways to deploy: the Kubernetes manifests validate and use only real flags; the image
installs with the same scripts/setup.sh as `make run`; the container's entrypoint, started the way
a runtime starts it (PID 1 of new PID and mount namespaces), profiles a workload and stops
cleanly on SIGTERM.

No container engine runs on the machines these tests run on, so the image itself is not built
here (docs/deploy.md); the entrypoint is run from the checkout instead, which is what the image
holds at /opt/parca-agent."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time

import kubernetes_validate
import pytest
import yaml

from tests.helpers.agent import Agent, bpf_program_ids, bpf_program_loaded
from tests.helpers.services import ROOT, free_port, wait_until
from tests.helpers.workload import build_chain_workload

DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
DOCKERFILE = DEPLOY / "Dockerfile"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
# A recent release whose schemas kubernetes-validate bundles; strict: unknown fields fail too.
KUBERNETES_VERSION = "1.33.0"


def manifest_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def help_flags() -> set[str]:
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "services.cli", "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=True).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out))


def flags_in(words) -> set[str]:
    return {w.split("=", 1)[0] for w in words if w.startswith("--")}


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments left out."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# --- the manifests --------------------------------------------------------------------------

def test_there_are_manifests_for_every_kind_the_daemonset_needs():
    kinds = {doc["kind"] for _, doc in manifest_documents()}
    assert kinds == {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                     "DaemonSet", "Service"}


@pytest.mark.parametrize("name,doc", manifest_documents(),
                         ids=[f"{n}:{d['kind']}" for n, d in manifest_documents()])
def test_manifest_validates_against_the_kubernetes_schema(name, doc):
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at "
                    f"{'.'.join(str(p) for p in e.path)}")


def test_every_flag_in_the_manifests_and_the_dockerfile_exists_in_help():
    known = help_flags()
    assert "--node" in known and "--http-address" in known, "could not read parca-agent --help"
    used = set()
    for _, doc in manifest_documents():
        for c in containers(doc):
            used |= flags_in(c.get("args", []) + c.get("command", []))
    assert used, "the DaemonSet passes no flags: the test would prove nothing"
    for word, rest in dockerfile_instructions():
        if word in ("CMD", "ENTRYPOINT"):
            used |= flags_in(yaml.safe_load(rest) if rest.startswith("[") else shlex.split(rest))
    assert used <= known, f"flags parca-agent does not have: {sorted(used - known)}"


def test_every_agent_environment_variable_in_the_manifests_is_a_flag():
    known = {"PARCA_AGENT_" + f[2:].replace("-", "_").upper() for f in help_flags()}
    for _, doc in manifest_documents():
        for c in containers(doc):
            names = {e["name"] for e in c.get("env", []) if e["name"].startswith("PARCA_AGENT_")}
            assert names <= known, f"unknown settings: {sorted(names - known)}"


def daemonset() -> dict:
    return next(doc for _, doc in manifest_documents() if doc["kind"] == "DaemonSet")


def test_daemonset_names_the_node_from_the_downward_api():
    (agent,) = daemonset()["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "--node=$(NODE_NAME)" in agent["args"]


def test_daemonset_shares_the_host_pid_namespace_and_mounts_host_paths_read_only():
    pod = daemonset()["spec"]["template"]["spec"]
    # The agent reads /proc/<pid> of the pids BPF reports, which are the host's.
    assert pod["hostPID"] is True
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    (agent,) = pod["containers"]
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    for path in ("/sys/fs/cgroup", "/sys/kernel/debug", "/sys/fs/bpf", "/lib/modules", "/usr/src"):
        names = [n for n, p in host_paths.items() if p == path]
        assert names, f"{path} is not mounted from the host"
        assert mounts[names[0]].get("readOnly") is True, f"{path} should be read-only"


def test_cluster_role_only_reads_pods():
    role = next(doc for _, doc in manifest_documents() if doc["kind"] == "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["get", "list", "watch"]}]


def test_probes_and_the_service_use_the_ui_port():
    (agent,) = daemonset()["spec"]["template"]["spec"]["containers"]
    port = next(p for p in agent["ports"] if p["name"] == "http")
    assert f"--http-address=:{port['containerPort']}" in agent["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert agent[probe]["httpGet"]["path"] == "/healthz"
        assert agent[probe]["httpGet"]["port"] in ("http", port["containerPort"])
    service = next(doc for _, doc in manifest_documents() if doc["kind"] == "Service")
    assert service["spec"]["selector"] == daemonset()["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] in ("http", port["containerPort"])


# --- the image ------------------------------------------------------------------------------

def test_dockerfile_installs_with_the_set_up_make_run_uses():
    instructions = dockerfile_instructions()
    runs = [rest for word, rest in instructions if word == "RUN"]
    assert any("scripts/setup.sh" in r for r in runs), "the image must install with setup.sh"
    # Anything installed beside setup.sh would let the image and `make run` drift apart.
    for r in runs:
        assert not re.search(r"apt-get install|pip install|useradd", r), r
    assert instructions[0][0] == "FROM" and "bookworm" in instructions[0][1]
    assert "setup:" in (ROOT / "Makefile").read_text()
    assert "scripts/setup.sh" in (ROOT / "Makefile").read_text()


def test_set_up_switches_the_image_uses_exist():
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for switch in re.findall(r"(PARCA_AGENT_SETUP_[A-Z_]+)=", runs + ENTRYPOINT.read_text()):
        assert f"${{{switch}:-}}" in setup, f"scripts/setup.sh does not read {switch}"
    # The entrypoint's fallback: on this machine (set up by make test) a no-op that installs
    # nothing, whatever else setup.sh would do.
    r = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], check=False,
                       env=dict(os.environ, PARCA_AGENT_SETUP_ONLY="headers"),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_dockerfile_runs_the_entrypoint_and_checks_healthz():
    instructions = dict(dockerfile_instructions())
    assert str(ENTRYPOINT.relative_to(ROOT)) in instructions["ENTRYPOINT"]
    assert "entrypoint.sh" in instructions["HEALTHCHECK"]
    assert "healthcheck" in instructions["HEALTHCHECK"]
    assert "/healthz" in ENTRYPOINT.read_text()
    assert os.access(ENTRYPOINT, os.X_OK), "the entrypoint must be executable"


def run_entrypoint(*args: str, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENTRYPOINT), *args], env=dict(os.environ, **environment),
                          check=False, capture_output=True, text=True, timeout=60)


def test_entrypoint_links_the_nodes_headers_from_the_host_mount(tmp_path):
    # A node whose /lib/modules/<release>/build points, as Debian's do, to /usr/src on the node.
    release = os.uname().release
    host = tmp_path / "host"
    headers = host / "usr" / "src" / f"linux-headers-{release}"
    (headers / "include").mkdir(parents=True)
    (host / "lib" / "modules" / release).mkdir(parents=True)
    os.symlink(f"/usr/src/linux-headers-{release}", host / "lib" / "modules" / release / "build")
    modules = tmp_path / "modules"
    r = run_entrypoint("--help", PARCA_AGENT_HOST_ROOT=str(host),
                       PARCA_AGENT_MODULES_DIR=str(modules))
    assert r.returncode == 0, r.stderr
    assert "usage: parca-agent" in r.stdout, "the entrypoint must hand over to parca-agent"
    assert os.readlink(modules / release / "build") == str(headers)


def test_entrypoint_leaves_headers_that_are_already_in_place(tmp_path):
    release = os.uname().release
    modules = tmp_path / "modules"
    (modules / release / "build" / "include").mkdir(parents=True)
    r = run_entrypoint("--help", PARCA_AGENT_HOST_ROOT=str(tmp_path / "nothing"),
                       PARCA_AGENT_MODULES_DIR=str(modules))
    assert r.returncode == 0, r.stderr
    assert not (modules / release / "build").is_symlink()


# --- the container, run the way a runtime runs it -----------------------------------------

class Container(Agent):
    """deploy/entrypoint.sh as PID 1 of new PID and mount namespaces, as a runtime starts it;
    read over HTTP like the agent of the end-to-end tests.

    An outer private mount namespace bind-mounts the host's /proc for --proc-path, as
    `docker run -v /proc:/host/proc` would: BPF reports the host's pids, and the namespace's
    own /proc (--mount-proc) knows only its own processes. The DaemonSet uses hostPID instead."""

    def __init__(self, base: str, *flags: str):  # not Agent's: that starts parca-agent itself
        self.base = base
        self.run_dir = os.path.join(base, "run")
        self.cache_dir = os.path.join(base, "cache")
        self.host_proc = os.path.join(base, "host-proc")
        os.makedirs(self.host_proc)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base, "container.log")
        script = 'mount --bind /proc "$1" && shift && exec "$@"'
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARCA_AGENT_")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                 self.host_proc,
                 # --kill-child: if the runtime side dies, the namespace's PID 1 dies with it.
                 "unshare", "--pid", "--fork", "--mount-proc", "--kill-child", str(ENTRYPOINT),
                 "--kubernetes=false", f"--http-address=127.0.0.1:{self.port}",
                 f"--run-dir={self.run_dir}", f"--cache-dir={self.cache_dir}",
                 f"--proc-path={self.host_proc}", *flags],
                cwd="/", env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def pid1(self) -> int | None:
        """The host pid of the namespace's PID 1: the inner unshare's only child."""
        for pid in _children(self.proc.pid):
            if _status(pid).get("NSpid", "").split()[1:] == ["1"]:
                return pid
        return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def _status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)
    except OSError:
        return {}


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return [a.decode() for a in fh.read().split(b"\0") if a]


@pytest.mark.bpf
@pytest.mark.e2e
def test_container_entrypoint_as_pid_1_profiles_and_stops_cleanly_on_sigterm(require_bpf):
    for tool in ("unshare", "mount"):
        assert shutil.which(tool), f"{tool} (util-linux) is missing"
    # World-traversable: the unprivileged services must reach the run and cache directories.
    base = tempfile.mkdtemp(prefix="parca-agent-container-", dir="/tmp")
    os.chmod(base, 0o755)
    workload = subprocess.Popen([str(build_chain_workload(os.path.join(base, "bin"))), "0", "100"])
    container = Container(base, "--profiling-duration=3s")
    try:
        pid1 = wait_until(container.pid1, 20)
        assert pid1, f"no PID 1 in the new namespace:\n{container.log()}"
        # exec all the way: a shell left as PID 1 would not pass SIGTERM on.
        assert wait_until(lambda: "parca-agent" in " ".join(_cmdline(pid1)), 20), \
            f"PID 1 is {_cmdline(pid1)}, not parca-agent"

        target = container.wait_for_profile(
            lambda labels: labels.get("comm") == "chain" and labels.get("pid") == str(workload.pid),
            seconds=90)
        assert target, f"no profile of the workload within 90 s:\n{container.log()}"

        health = run_entrypoint("healthcheck",
                                PARCA_AGENT_HTTP_ADDRESS=f"127.0.0.1:{container.port}")
        assert health.returncode == 0, f"the image's HEALTHCHECK fails: {health.stderr}"

        # parca-agent passes its settings to supervisord and the services in the environment.
        assert len(container.descendants()) >= 6, "supervisord and five services should run"
        ours = bpf_program_ids(container.service_pids()["collector"])
        assert ours, "the collector holds no BPF program"
        started = time.monotonic()
        os.kill(pid1, signal.SIGTERM)
        try:
            code = container.proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"PID 1 did not stop within 10 s of SIGTERM:\n{container.log()}")
        took = time.monotonic() - started
        assert code == 0, f"exit status {code}:\n{container.log()}"
        assert took < 10
        assert container.descendants() == [], "a process survived SIGTERM"
        assert os.listdir(container.run_dir) == [], \
            f"files left in the run directory:\n{container.log()}"
        # Other agents may run on this machine: only the collector's own programs must go.
        assert wait_until(lambda: not any(bpf_program_loaded(p) for p in ours), 5), \
            "a BPF program survived SIGTERM"
        assert workload.poll() is None, "stopping the container must not touch host processes"
    finally:
        container.cleanup()  # also removes base
        workload.kill()
        workload.wait()
