"""A real Ray cluster of separate node processes on this machine, for tests.

Each node is `ray start --block` in its own process group with its own temporary dir and its own
VPTDASH_HOME (so a node cannot read the driver's uploads through the data dir). Stopping or killing a
node signals only that group: `ray stop` would stop every Ray process of this user on the machine."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []

    def _start(self, name: str, head: bool, **env: str) -> subprocess.Popen:
        # A short temp dir: Ray's socket paths must stay under the 107-character limit.
        temp = tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp")
        home = self.root / f"home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        args = [RAY, "start", "--block", "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", temp]
        args += ["--disable-usage-stats", "--dashboard-agent-listen-port", str(free_port())]
        args += (
            ["--head", "--port", str(self.port), "--include-dashboard=false"] if head else ["--address", self.address]
        )
        environment = {
            **{k: v for k, v in os.environ.items() if k not in ("VPTDASH_HOME", "PYTHONPATH", "RAY_ADDRESS")},
            "VPTDASH_HOME": str(home),
            # A dead node is noticed in about a second instead of the default ~30 s.
            "RAY_AUTH_MODE": "disabled",  # test nodes on this machine only; a real cluster keeps its token
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "500",
            "RAY_health_check_failure_threshold": "2",
            **env,
        }
        log = open(self.root / f"{name}.log", "ab")
        process = subprocess.Popen(
            args, env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=temp, start_new_session=True
        )
        log.close()
        process.temp_dir = temp
        process.name = name
        return process

    def start(self, workers: int = 1, timeout: float = 60.0) -> "LocalCluster":
        self.nodes.append(self._start("head", head=True))
        self._wait_for_gcs(timeout)
        for index in range(workers):
            self.nodes.append(self._start(f"node{index + 1}", head=False))
        return self

    def wait_for_nodes(self, ray, timeout: float = 120.0) -> None:
        """Until every started node has joined (alive in `ray.nodes()`; `ray` connected to this cluster).
        A worker node whose `ray start` exited first is started once more: its ports were free when picked,
        and another process on a busy machine may have taken one since. Without this wait a test that
        needs the second node found only the head, and timed out with no reason given."""
        deadline = time.monotonic() + timeout
        restarted: set[int] = set()
        while sum(1 for node in ray.nodes() if node.get("Alive")) < len(self.nodes):
            for index, node in enumerate(self.nodes):
                if node.poll() is None:
                    continue
                tail = (self.root / f"{node.name}.log").read_text(errors="replace")[-2000:]
                if index == 0 or index in restarted:
                    raise RuntimeError(f"ray {node.name} exited (code {node.returncode}): {tail}")
                restarted.add(index)
                print(f"ray {node.name} exited (code {node.returncode}), starting it again: {tail}", file=sys.stderr)
                self.nodes[index] = self._start(node.name, head=False)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.nodes)} Ray nodes started, not all joined within {timeout:.0f} s")
            time.sleep(0.2)

    def _wait_for_gcs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.nodes[0].poll() is not None:
                raise RuntimeError(f"ray head exited: {(self.root / 'head.log').read_text()[-2000:]}")
            time.sleep(0.2)
        raise TimeoutError("ray head did not start")

    def kill(self, node: subprocess.Popen) -> None:
        """Kill a node outright: its raylet, object store and every worker on it (Ray puts each worker in
        a process group of its own, but all stay in the session `ray start` began)."""
        for pid in [node.pid, *session_members(node.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.wait(timeout=30)

    def stop(self) -> None:
        """Kill every node (a test cluster keeps nothing worth a graceful drain, which takes ~20 s)."""
        for node in reversed(self.nodes):
            if node.poll() is None:
                self.kill(node)
            for pid in pids_mentioning(node.temp_dir):  # helpers of this node that outlived its group
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            # Ray leaves its session (logs, sockets, spilled objects) behind: a few MB a node on every run.
            shutil.rmtree(node.temp_dir, ignore_errors=True)


def session_members(sid: int) -> list[int]:
    """Processes in the session `sid` (a node's `ray start --block` began it)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    members.append(int(entry.name))
            except OSError:
                continue
    return members


def pids_mentioning(text: str) -> list[int]:
    """Processes of this user whose command line contains `text` (a node's own temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid == os.getuid() and text in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found
