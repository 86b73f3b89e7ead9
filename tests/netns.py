"""Machines for tests: one Linux network namespace per node, each with its own IP on one
shared LAN (a bridge in a hub namespace), as people on different machines would be.

Only addresses inside namespaces this harness creates are used (10.88.0.0/24), never the
host's. Needs root and `ip` (iproute2); `available()` says why not, for a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SUBNET = "10.88.0"


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"smprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace: {exc.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


class Lan:
    """`hosts` namespaces named <tag>-<name>, host i at 10.88.0.<i+1>/24."""

    def __init__(self, names: list[str], tag: str | None = None) -> None:
        self.tag = tag or f"sm{os.getpid() % 100000}"
        self.names = list(names)
        self.hub = f"{self.tag}-hub"
        self.processes: dict[str, subprocess.Popen] = {}

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def ip(self, name: str) -> str:
        return f"{SUBNET}.{self.names.index(name) + 1}"

    def __enter__(self) -> "Lan":
        try:
            _ip("netns", "add", self.hub)
            _ip("link", "add", "br0", "type", "bridge", ns=self.hub)
            _ip("link", "set", "br0", "up", ns=self.hub)
            for i, name in enumerate(self.names):
                ns, outer = self.ns(name), f"v{i}"
                _ip("netns", "add", ns)
                _ip("link", "set", "lo", "up", ns=ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=self.hub)
                _ip("link", "set", outer, "master", "br0", ns=self.hub)
                _ip("link", "set", outer, "up", ns=self.hub)
                _ip("addr", "add", f"{self.ip(name)}/24", "dev", "eth0", ns=ns)
                _ip("link", "set", "eth0", "up", ns=ns)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for name in list(self.processes):
            self.stop(name, sig=signal.SIGKILL)
        for ns in [self.ns(n) for n in self.names] + [self.hub]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def run(self, name: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns(name), *argv], **kwargs)

    def start(self, name: str, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """A long-running process on host `name`, its output in `log`."""
        out = open(log, "ab")
        process = subprocess.Popen(["ip", "netns", "exec", self.ns(name), *argv], stdout=out,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
        out.close()
        self.processes[name] = process
        return process

    def stop(self, name: str, *, sig: int = signal.SIGINT, timeout_s: float = 30) -> int | None:
        process = self.processes.pop(name, None)
        if process is None:
            return None
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return process.poll()
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        return process.returncode
