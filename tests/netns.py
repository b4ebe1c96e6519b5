"""Separate hosts on one machine: Linux network namespaces joined by a bridge.

Each host is a network namespace with one interface (``eth0``) on a private /24 that exists
only inside the namespaces this harness creates; a "switch" namespace holds the bridge. Nothing
reaches the machine's own network, and everything is removed on exit. Names resolve through
``/etc/netns/<host>/hosts``, which ``ip netns exec`` mounts over ``/etc/hosts``, so TLS can be
verified against DNS names as in a real deployment. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

#: The private subnet inside the test's namespaces (never configured outside them).
SUBNET = "10.77.0"
ETC_NETNS = Path("/etc/netns")


class NamespacesUnavailable(RuntimeError):
    """This machine cannot create network namespaces (not root, or no ``ip``)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NamespacesUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Network:
    """Hosts named in ``names`` (a DNS name each gets in every host's /etc/hosts), numbered
    from 1 in order: host ``i`` has address ``10.77.0.i``."""

    names: dict[str, str]
    """host -> the DNS name the others know it by."""
    prefix: str = field(default_factory=lambda: f"fk{os.getpid() % 100000}")
    created: list[str] = field(default_factory=list)

    def namespace(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def address(self, host: str) -> str:
        return f"{SUBNET}.{list(self.names).index(host) + 1}"

    def __enter__(self) -> Network:
        if shutil.which("ip") is None:
            raise NamespacesUnavailable("no `ip` command (iproute2)")
        try:
            self._create()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _create(self) -> None:
        switch = self.namespace("switch")
        _ip("netns", "add", switch)
        self.created.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        hosts = "".join(f"{self.address(h)} {dns}\n" for h, dns in self.names.items())
        for number, host in enumerate(self.names, start=1):
            namespace = self.namespace(host)
            _ip("netns", "add", namespace)
            self.created.append(namespace)
            port = f"p{number}"
            _ip("link", "add", port, "netns", switch, "type", "veth",
                "peer", "name", "eth0", "netns", namespace)
            _ip("-n", switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", namespace, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            etc = ETC_NETNS / namespace
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{hosts}")

    def __exit__(self, *_: object) -> None:
        for namespace in reversed(self.created):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
            shutil.rmtree(ETC_NETNS / namespace, ignore_errors=True)
        self.created.clear()

    def run_in(self, host: str) -> list[str]:
        """The argv prefix that runs a command on ``host``."""
        return ["ip", "netns", "exec", self.namespace(host)]

    def limit_rate(self, host: str, rate: str) -> None:
        """Shape what ``host`` sends to ``rate`` (tc's units: ``2mbit``), as a slow uplink."""
        done = subprocess.run(["tc", "-n", self.namespace(host), "qdisc", "add", "dev", "eth0",
                               "root", "tbf", "rate", rate, "burst", "32kbit", "latency", "2s"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise NamespacesUnavailable(f"tc: {done.stderr.strip()}")

    def received_bytes(self, host: str) -> int:
        """Bytes ``host`` received on its link: proof that traffic crossed the veth."""
        done = subprocess.run([*self.run_in(host), "cat", "/sys/class/net/eth0/statistics/"
                               "rx_bytes"], capture_output=True, text=True, check=True)
        return int(done.stdout)
