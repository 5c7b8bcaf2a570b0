"""A container sees only what it needs: functions without an image, run through a real
control plane under each isolating runtime, look for a fixed list of the host's files and
must find none of them; they run as an unprivileged user, and under bwrap with a seccomp
filter. The ``process`` runtime isolates nothing and says so.

Canaries the test plants on the host (each removed afterwards): a dotfile in ``/root``, a
folder in ``/var/tmp``, another user's home, a folder under ``/tmp`` on the worker's import
path; besides the host's own secrets (``/etc/shadow``...), the checkout of this test run
and the worker's ``STRATO_HOME``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import dedicated_server

from strato.runtime import ContainerLaunch, get_runtime
from strato.runtime.base import Bind
from strato.runtime.isolation import container_ids, interpreter_dirs
from strato.runtime.process import ProcessRuntime

sys.path.insert(0, str(Path(__file__).resolve().parent))
import isolation_apps as apps  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="isolating runtimes need root"),
]

REPO = Path(__file__).resolve().parents[2]
TAG = uuid.uuid4().hex[:10]
HOST_SECRETS = [
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/sudoers",
    "/etc/ssh",
    "/etc/gitconfig",
    "/etc/pip.conf",
    "/etc/machine-id",
    "/root/.bashrc",
    "/root/.ssh",
    "/root/.cache",
    "/root/.config",
    "/var/tmp",
    "/var/lib",
    "/var/log",
    "/srv",
    "/mnt",
    "/media",
    str(REPO / "pyproject.toml"),
    str(REPO / ".git"),
    str(REPO / "tests"),
    str(REPO / "src"),
]


def _not_the_interpreter(path: str) -> bool:
    """Paths the container may legitimately see because the interpreter lives there."""
    return not any(path == d or path.startswith(d + "/") for d in interpreter_dirs(sys.executable))


@pytest.fixture(scope="module")
def canaries():
    """Files and folders planted on the host, each of which no container may see."""
    planted = {
        "root_dotfile": Path(f"/root/.strato-canary-{TAG}"),
        "var_tmp": Path(f"/var/tmp/strato-canary-{TAG}"),
        "other_home": Path(f"/home/strato-canary-{TAG}"),
        "import_path": Path(tempfile.mkdtemp(prefix=f"strato-canary-pp-{TAG}-", dir="/tmp")),
        "opt": Path(f"/opt/strato-canary-{TAG}"),
    }
    planted["root_dotfile"].write_text("credentials")
    for key in ("var_tmp", "other_home", "opt"):
        planted[key].mkdir(parents=True)
        (planted[key] / "secret.txt").write_text("secret")
    (planted["import_path"] / "canary_module.py").write_text("SECRET = 1\n")
    planted["import_path"].chmod(0o755)
    try:
        yield planted
    finally:
        planted["root_dotfile"].unlink(missing_ok=True)
        for key in ("var_tmp", "other_home", "import_path", "opt"):
            shutil.rmtree(planted[key], ignore_errors=True)


@pytest.fixture(scope="module")
def server(strato_server, canaries):
    """A control plane whose worker has a canary folder under /tmp on its import path."""
    pp = os.pathsep.join([str(canaries["import_path"]), os.environ.get("PYTHONPATH", "")])
    with dedicated_server({"PYTHONPATH": pp}) as handle, apps.app.run(quiet=True):
        yield handle


def _forbidden(server, canaries) -> list[str]:
    paths = [*HOST_SECRETS]
    paths += [str(canaries["root_dotfile"]), str(canaries["var_tmp"] / "secret.txt")]
    paths += [str(canaries["other_home"]), str(canaries["other_home"] / "secret.txt")]
    paths += [str(canaries["opt"]), str(canaries["import_path"])]
    paths += [str(canaries["import_path"] / "canary_module.py")]
    paths += [str(server.home), str(server.home / "server.json"), str(server.home / "state.db")]
    return [p for p in paths if _not_the_interpreter(p)]


@pytest.mark.parametrize("runtime", apps.RUNTIMES)
def test_host_paths_are_invisible(server, canaries, runtime):
    forbidden = _forbidden(server, canaries)
    assert len(forbidden) >= 25, forbidden
    seen = apps.fns[runtime]["probe"].remote(forbidden)
    visible = {p: s for p, s in seen["paths"].items() if s["exists"] or s["readable"]}
    assert visible == {}, f"{runtime} container sees the host's {sorted(visible)}"
    print(f"{runtime}: {len(forbidden)} host paths probed, none visible")


@pytest.mark.parametrize("runtime", apps.RUNTIMES)
def test_runs_as_an_unprivileged_user(server, runtime):
    seen = apps.fns[runtime]["probe"].remote([])
    uid, gid = container_ids()
    assert (seen["uid"], seen["euid"], seen["gid"]) == (uid, uid, gid) and uid != 0
    assert int(seen["cap_eff"], 16) == 0, "the container's process holds capabilities"


def _host_status(container_id: str) -> dict[str, str] | None:
    """/proc/<pid>/status, read from the host, of the container's Python process."""
    needle = f"STRATO_CONTAINER_ID={container_id}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            if "python" not in os.path.basename(os.readlink(f"/proc/{entry}/exe")):
                continue  # bwrap's monitor or init (the runtime's own, root by design)
            with open(f"/proc/{entry}/status") as f:
                return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        except OSError:
            continue
    return None


def test_bwrap_process_is_unprivileged_on_the_host(server):
    seen = apps.fns["bwrap"]["probe"].remote([])
    status = _host_status(seen["container_id"])  # the container stays up (keep-alive)
    assert status is not None, "the container's process was not found on the host"
    uid, gid = container_ids()
    assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(gid)] * 4
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"


def test_bwrap_seccomp_denies_dangerous_syscalls(server):
    seen = apps.fns["bwrap"]["probe"].remote([])
    assert seen["seccomp"] == "2" and seen["no_new_privs"] == "1"
    assert seen["syscalls"] == {
        "unshare_user": "EPERM",
        "keyctl": "EPERM",
        "ptrace_attach_1": "EPERM",
    }


@pytest.mark.parametrize("runtime", apps.RUNTIMES)
def test_file_written_to_a_bind_is_owned_by_the_unprivileged_user(runtime, tmp_path):
    """From the host's side: what the container writes is not root's."""
    rt = get_runtime(runtime)
    uid, gid = container_ids()
    tmp_path.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, uid, gid)
    code = "open('/data/written', 'w').write('x'); import os; print(os.getuid())"
    spec = ContainerLaunch(
        f"sec-{uuid.uuid4().hex[:12]}",
        [sys.executable, "-c", code],
        {"PATH": "/usr/bin:/bin"},
        cwd="/",
        binds=[Bind(str(out), "/data", readonly=False)],
        block_network=True,
    )

    async def main():
        c = await rt.start(spec)
        got, err = await asyncio.gather(c.stdout.read(), c.stderr.read())
        return got, err, await c.wait()

    got, err, status = asyncio.run(main())
    assert status.exit_code == 0, err.decode()
    st = (out / "written").stat()
    assert (st.st_uid, st.st_gid) == (uid, gid) and st.st_uid != 0
    assert got.decode().strip() == str(uid)


def test_process_runtime_says_it_is_not_isolated():
    rt = ProcessRuntime(use_cgroups=False)
    assert rt.capabilities.isolation is False and rt.capabilities.network_control is False
    assert "no isolation" in rt.describe()
