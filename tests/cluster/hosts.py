"""Several hosts on one machine, for multi-node tests: each host a network namespace with addresses that exist
only inside it, joined by two switches (bridges in a namespace of their own), as cluster nodes are joined by
their ordinary network and a fabric. Nothing is added to the machine's own network: no interface, address or
route outside the namespaces, and no default route inside them.

    eth0, 10.77.0.0/24: the cluster network. Host names resolve here; Slurm, the rendezvous (MASTER_ADDR) and,
    unless told otherwise, the ranks' traffic use it.
        10.77.0.254  head    the switch namespace: the bridge's own address (Slurm's controller lives here)
        10.77.0.1    node0   eth0 of namespace <prefix>-node0
        10.77.0.2    node1   ...
    eth1, 10.78.0.0/24: the fabric (10.78.0.1, 10.78.0.2, ...), which carries only what names it
        (GLOO_SOCKET_IFNAME=eth1), like an InfiniBand or RoCE fabric that only NCCL uses.

A process enters a host with `Hosts.command(i, cmd)`: the host's network namespace (nsenter --net: `ip netns
exec` would remount /sys, and slurmd then finds no cgroup file system), and a private mount and UTS
namespace in which the hostname is `node<i>`, /etc/hosts names every host (like a cluster's DNS), and /dev/shm
is a tmpfs of its own (Streaming keys its shared memory by node, and real nodes do not share it).

Faults, as a cluster sees them:
    partition(net)  on network `net` (eth0 or eth1) hosts no longer reach each other, silently (bridge port
                    isolation: packets are dropped, no error, no reset), while every host still reaches `head`;
                    heal(net) undoes it
    unplug(i)       host i loses its links to both switches (plug(i) restores them)
    kill(i)       every process inside host i (SIGKILL), as when a node dies

Namespaces are named `<prefix>-...` with a prefix unique to the session (it holds the pid of the test process,
so that a later session can remove what a killed one left behind: `remove_stale`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Self

NETWORKS = {"eth0": "10.77.0", "eth1": "10.78.0"}  # interface in every host -> its /24
SUBNET = NETWORKS["eth0"]
HEAD_ADDR = f"{SUBNET}.254"
NETNS_DIR = Path("/run/netns")
_PREFIX_RE = re.compile(r"^dipt(\d+)x[0-9a-f]{4}-")


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def namespaces_possible() -> str | None:
    """None when this process can create network namespaces, else why not."""
    if os.geteuid() != 0:
        return "network namespaces as hosts need root"
    for tool in ("ip", "nsenter", "unshare", "bridge"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: iproute2, util-linux)"
    probe = f"dipt{os.getpid()}x{secrets.token_hex(2)}-probe"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def remove_stale() -> None:
    """Delete the namespaces of earlier test sessions whose process is gone (killed before its teardown)."""
    if not NETNS_DIR.is_dir():
        return
    for ns in NETNS_DIR.iterdir():
        m = _PREFIX_RE.match(ns.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False)


class Hosts:
    def __init__(self, n: int, root: Path):
        assert 2 <= n <= 200
        self.n = n
        self.root = root
        self.prefix = f"dipt{os.getpid()}x{secrets.token_hex(2)}"
        self.switch = f"{self.prefix}-net"
        self.names = [f"node{i}" for i in range(n)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self.etc_hosts = root / "hosts"
        self._created: list[str] = []

    # -- life cycle ---------------------------------------------------------------------------------

    def create(self) -> Hosts:
        remove_stale()
        self.root.mkdir(parents=True, exist_ok=True)
        self.etc_hosts.write_text("127.0.0.1 localhost\n" + f"{HEAD_ADDR} head\n"
                                  + "".join(f"{a} {h}\n" for a, h in zip(self.addrs, self.names)))
        self._add_ns(self.switch)
        _ip("-n", self.switch, "link", "set", "lo", "up")
        for net, subnet in NETWORKS.items():
            _ip("-n", self.switch, "link", "add", self._bridge(net), "type", "bridge")
            _ip("-n", self.switch, "addr", "add", f"{subnet}.254/24", "dev", self._bridge(net))
            _ip("-n", self.switch, "link", "set", self._bridge(net), "up")
        for i in range(self.n):
            ns = self.netns(i)
            self._add_ns(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            for net, subnet in NETWORKS.items():
                # The pair is born with one end in each namespace: no name ever appears outside them.
                port = self._port(i, net)
                _ip("-n", ns, "link", "add", net, "type", "veth", "peer", "name", port, "netns", self.switch)
                _ip("-n", self.switch, "link", "set", port, "master", self._bridge(net), "up")
                _ip("-n", ns, "addr", "add", f"{subnet}.{i + 1}/24", "dev", net)
                _ip("-n", ns, "link", "set", net, "up")
        return self

    def close(self) -> None:
        """Kill every process inside the namespaces, then delete them (also after a failed create)."""
        for ns in self._created:
            for pid in self._pids_in(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._created.clear()

    def __enter__(self) -> Self:
        try:
            return self.create()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created.append(ns)

    def netns(self, i: int) -> str:
        return f"{self.prefix}-{self.names[i]}"

    @staticmethod
    def _port(i: int, net: str) -> str:
        return f"{net}-node{i}"

    @staticmethod
    def _bridge(net: str) -> str:
        return f"br-{net}"

    # -- running things inside ----------------------------------------------------------------------

    def command(self, i: int | None, cmd: list[str], shm: bool = True) -> list[str]:
        """`cmd` as run on host i (None: on `head`, the switch namespace)."""
        ns, name = (self.switch, "head") if i is None else (self.netns(i), self.names[i])
        setup = 'hostname "$1" && mount --bind "$2" /etc/hosts'
        if shm:
            setup += " && mount -t tmpfs tmpfs /dev/shm"
        return ["nsenter", f"--net={NETNS_DIR / ns}", "--", "unshare", "--mount", "--uts", "--propagation", "private",
                "--", "sh", "-c", setup + ' && shift 2 && exec "$@"', "sh", name, str(self.etc_hosts), *cmd]

    def popen(self, i: int | None, cmd: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(i, cmd), **kwargs)

    def run(self, i: int | None, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(i, cmd), check=False, **kwargs)

    def _ns_inode(self, ns: str) -> int:
        return os.stat(NETNS_DIR / ns).st_ino

    def _pids_in(self, ns: str) -> list[int]:
        try:
            inode = self._ns_inode(ns)
        except FileNotFoundError:
            return []
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if os.stat(proc / "ns" / "net").st_ino == inode:
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids

    def pids(self, i: int) -> list[int]:
        """Every process inside host i."""
        return self._pids_in(self.netns(i))

    # -- faults -------------------------------------------------------------------------------------

    def kill(self, i: int) -> int:
        """SIGKILL every process inside host i, as when the node dies; returns how many there were."""
        killed = 0
        for _ in range(20):  # a process may fork while we kill
            pids = self.pids(i)
            if not pids:
                return killed
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"processes left in {self.names[i]}: {self.pids(i)}")

    def partition(self, net: str = "eth0", isolated: bool = True) -> None:
        """On network `net`, hosts stop reaching each other (packets vanish); each still reaches `head`."""
        for i in range(self.n):
            subprocess.run(["bridge", "-n", self.switch, "link", "set", "dev", self._port(i, net), "isolated",
                            "on" if isolated else "off"], check=True)

    def heal(self, net: str = "eth0") -> None:
        self.partition(net, isolated=False)

    def unplug(self, i: int) -> None:
        for net in NETWORKS:
            _ip("-n", self.switch, "link", "set", self._port(i, net), "down")

    def plug(self, i: int) -> None:
        for net in NETWORKS:
            _ip("-n", self.switch, "link", "set", self._port(i, net), "up")

    # -- measuring ----------------------------------------------------------------------------------

    def counters(self, i: int, net: str = "eth0") -> tuple[int, int]:
        """(received, sent) bytes of host i's interface `net` since it was created (the kernel's counters)."""
        r = subprocess.run(["ip", "-n", self.netns(i), "-j", "-s", "link", "show", "dev", net],
                           capture_output=True, text=True, check=True)
        stats = json.loads(r.stdout)[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]
