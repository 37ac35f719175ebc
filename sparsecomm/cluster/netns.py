"""N emulated hosts on one machine: network namespaces, a bridge, tbf-shaped links. Needs root.

Topology (names carry a per-cluster tag so concurrent clusters never collide):

    netns <tag>-br:  bridge br0 with ports v0 .. v{N-1}
    netns <tag>-h{i}: eth0 = 10.213.<subnet>.{i+1}/24, veth peer of v{i}, plus lo

With `rate_mbit`, both directions of every host link are shaped with `tbf` (host eth0 egress
and bridge port v{i} egress), so each host has R up and R down, as on a switched network.
This kernel has no netem: no delay or loss emulation, only rate.

Only addresses inside these namespaces are used; everything created is removed by `down()`,
which `with EmulatedCluster(...)`, atexit and SIGINT/SIGTERM all call, and processes started
with `popen()`, and what they started (torchrun's workers run in sessions of their own), are
ended by their pid first (`stop_processes`).

Running torchrun across namespaces: every namespace resolves the
hostname to 127.0.0.1, so set GLOO_SOCKET_IFNAME=eth0 and, with c10d rendezvous,
`--local-addr <host address>` plus `--rdzv-conf is_host=1` on the store host (0 elsewhere);
the static form `--master-addr/--master-port` needs only GLOO_SOCKET_IFNAME. `torchrun_env()`
and `torchrun_args()` produce both.
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import time
import uuid
from typing import Sequence


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time in clock ticks) of a live process, from /proc/PID/stat; None if gone."""
    try:
        raw = open(f"/proc/{pid}/stat", "rb").read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z" and st[2] == start


TAG_ENV = "SPARSECOMM_CLUSTER"  # every process popen() starts, and its descendants, carry the cluster's tag


def _tagged(tag: str) -> list[tuple[int, int]]:
    """(pid, start time) of every other live process whose environment carries TAG_ENV=tag."""
    needle = f"{TAG_ENV}={tag}".encode()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                env = open(f"/proc/{d}/environ", "rb").read()
            except OSError:
                continue
            if needle in env.split(b"\0"):
                st = _stat(int(d))
                if st is not None:
                    out.append((int(d), st[2]))
    return out


def _process_tree(root: int) -> list[tuple[int, int]]:
    """(pid, start time) of `root` and every live descendant."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                children.setdefault(st[1], []).append(int(d))
                starts[int(d)] = st[2]
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            out.append((pid, starts[pid]))
        todo.extend(children.get(pid, ()))
    return out


def can_create_namespaces() -> tuple[bool, str]:
    """(True, "") if this process may create network namespaces, else (False, reason)."""
    if os.geteuid() != 0:
        return False, "needs root to create network namespaces"
    tag = f"scprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", tag], capture_output=True, text=True)
    if r.returncode:
        return False, f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", tag], capture_output=True)
    return True, ""


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")


def _tc(ns: str, dev: str, rate_mbit: float) -> None:
    # burst: ~4 ms worth of bytes at the rate, at least 64 KiB, so tbf can reach its rate
    burst = max(64 * 1024, int(rate_mbit * 1e6 / 8 * 0.004))
    r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                        "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "200ms"], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"tc tbf on {ns}/{dev} failed: {r.stderr.strip()}")


class EmulatedCluster:
    def __init__(self, n_hosts: int, rate_mbit: float | None = None, subnet: int | None = None, tag: str | None = None):
        if not 1 <= n_hosts <= 250:
            raise ValueError(f"n_hosts must be in [1, 250], got {n_hosts}")
        if rate_mbit is not None and rate_mbit <= 0:
            raise ValueError(f"rate_mbit must be > 0, got {rate_mbit}")
        self.n_hosts, self.rate_mbit = n_hosts, rate_mbit
        self.tag = tag or f"sc{uuid.uuid4().hex[:6]}"
        self.subnet = subnet if subnet is not None else int(self.tag[-2:], 16) % 250
        self.bridge_ns = f"{self.tag}-br"
        self.hosts = [f"{self.tag}-h{i}" for i in range(n_hosts)]
        self.addresses = [f"10.213.{self.subnet}.{i + 1}" for i in range(n_hosts)]
        self.procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._old_handlers: dict = {}

    # ------------------------------------------------------------------ lifecycle
    def up(self, persist: bool = False) -> "EmulatedCluster":
        """Create the namespaces, bridge and links. With persist=True they outlive this process
        (`sparsecomm cluster up`); a failure half-way still removes what was made."""
        atexit.register(self.down)
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: rely on atexit / the caller
                pass
        try:
            self._add_ns(self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            for i, (ns, addr) in enumerate(zip(self.hosts, self.addresses)):
                self._add_ns(ns)
                _ip("-n", self.bridge_ns, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.bridge_ns, "link", "set", f"v{i}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                if self.rate_mbit:
                    _tc(ns, "eth0", self.rate_mbit)
                    _tc(self.bridge_ns, f"v{i}", self.rate_mbit)
        except BaseException:
            self.down()
            raise
        if persist:
            self._release_handlers()
        return self

    def adopt(self, namespaces: Sequence[str]) -> None:
        """Take charge of namespaces an earlier `up(persist=True)` made (for `down` or running on them)."""
        self._created = list(namespaces)

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)

    def _on_signal(self, signum, frame):
        self.down()
        old = self._old_handlers.get(signum)
        if callable(old):
            old(signum, frame)
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    def down(self) -> None:
        """End our processes (by pid), delete our namespaces (which removes their links). Idempotent."""
        self.stop_processes()
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._created.clear()
        self._release_handlers()

    def _release_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()
        atexit.unregister(self.down)

    def stop_processes(self, timeout_s: float = 10.0) -> None:
        """End the processes started with popen() and everything they started, by pid: TERM to their
        process groups, KILL after `timeout_s`, then KILL whatever descends from them and is left.

        The descendants matter: torchrun starts each worker in a session of its own, so a group kill
        misses workers that torchrun did not end itself (its shutdown past the deadline on a loaded
        machine, or a TERM that lands while it is still starting them: it exits before it knows
        them). Two records find them: the process trees (pid and start time, so a reused pid is
        never touched) taken before any signal, and the cluster's tag in the environment that
        popen() gives every process it starts and that their children inherit
        (SPARSECOMM_CLUSTER=<tag>), which also finds a worker spawned after the snapshot."""
        trees = [t for p in self.procs if p.poll() is None for t in _process_tree(p.pid)]
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        left = [(pid, start) for pid, start in trees if _alive(pid, start)]
        for _ in range(3):  # a dying worker may still start a child: sweep until nothing tagged is left
            left += [t for t in _tagged(self.tag) if t not in left]
            alive = [(pid, start) for pid, start in left if _alive(pid, start)]
            if not alive:
                break
            for pid, _ in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for _ in range(100):  # orphans are reaped by init, not by us: bounded wait until they are gone
                if not any(_alive(pid, start) for pid, start in alive):
                    break
                time.sleep(0.05)
        self.procs.clear()

    def process_env(self, env: dict | None = None) -> dict[str, str]:
        """The environment popen() starts processes with: ours, `env`, and this cluster's tag."""
        return {**os.environ, **(env or {}), TAG_ENV: self.tag}

    def __enter__(self) -> "EmulatedCluster":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # ------------------------------------------------------------------ running things
    def popen(self, host: int, cmd: Sequence[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """Start `cmd` inside host `host`'s namespace, in its own process group (so down() ends it)."""
        p = subprocess.Popen(["ip", "netns", "exec", self.hosts[host], *cmd], env=self.process_env(env),
                             start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def torchrun_env(self) -> dict[str, str]:
        return {"GLOO_SOCKET_IFNAME": "eth0"}

    def torchrun_args(self, host: int, port: int = 29500, nproc_per_node: int = 1) -> list[str]:
        """Static rendezvous on host 0: needs only GLOO_SOCKET_IFNAME (see the module docstring)."""
        return ["--nnodes", str(self.n_hosts), "--node-rank", str(host), "--nproc-per-node", str(nproc_per_node),
                "--master-addr", self.addresses[0], "--master-port", str(port)]
