"""Emulated nodes on one machine: network namespaces joined by rate-limited virtual links.

Why namespaces: each one has its own network stack (interfaces, addresses, ports, firewall), so
processes started in different namespaces can only talk over the virtual link between them, exactly
as two machines talk over a cable. The link rate is enforced with a token-bucket filter (``tbf``) on
every sending interface, packet loss with an ``iptables`` rule that drops a random fraction of the
incoming packets, and the kernel's per-interface byte counters tell what really crossed the "wire".

Layout:

- 2 nodes: one veth pair, ``eth0`` in each node, directly connected.
- more nodes: a dedicated "switch" namespace holding a bridge; each node's ``eth0`` is the other end
  of a veth whose switch side (``port<i>``) is enslaved to the bridge. The switch ports are shaped too,
  so a node that receives from several peers at once is still limited to the link rate.

Addresses are ``10.200.0.<i+1>/24`` inside the namespaces only; nothing is added to, or routed
through, the host's own network. Every namespace gets a name unique to this process and cluster
(``gc<pid>x<seq>n<i>``), so concurrent runs never collide, and :meth:`EmulatedCluster.close`
(called on leaving the ``with`` block, also on exceptions, Ctrl-C and SIGTERM/SIGHUP) stops every
process left inside the namespaces and deletes them, which deletes their links and rules as well.

Usage::

    with EmulatedCluster(nodes=2, rate="100mbit", loss=0.0) as cluster:
        before = cluster.nic_bytes()
        process = cluster.exec(0, ["python", "-c", "print('hello from node 0')"])
        process.wait()
        after = cluster.nic_bytes()
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import IO, Any, Iterator, Mapping, Optional, Sequence, Union

SUBNET = "10.200.0"  # every address lives inside namespaces created here; never on the host
PREFIX_LENGTH = 24
NODE_INTERFACE = "eth0"
QUEUE_LATENCY = "50ms"  # how long tbf may queue a packet before dropping it (the queue's length)

_cluster_sequence = itertools.count()
_RATE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps)\s*$", re.IGNORECASE)
_RATE_UNITS = {
    "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    # tc's "bps" means bytes per second
    "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9,
}


class ClusterError(RuntimeError):
    """A user-facing reason why the emulated cluster cannot be built or used (printed, not traced)."""


@dataclass(frozen=True)
class Node:
    """One emulated machine: its namespace, its interface towards the others and its address."""

    index: int
    namespace: str
    interface: str
    address: str


def parse_rate(rate: str) -> int:
    """A tc-style rate (``"100mbit"``, ``"1gbit"``, ``"500kbit"``, ``"10mbps"``) in bits per second.

    tc would accept more spellings; rejecting them here gives the user an error before any namespace
    exists, and the benchmark needs the number anyway (link-rate bound = bytes / rate).
    """
    match = _RATE_PATTERN.match(rate)
    if not match:
        raise ClusterError(f"cannot read link rate {rate!r}: use e.g. 100mbit, 1gbit, 500kbit")
    bits = float(match.group(1)) * _RATE_UNITS[match.group(2).lower()]
    if bits < 8000:
        raise ClusterError(f"link rate {rate!r} is too low to carry a TCP connection usefully (min 8kbit)")
    return int(bits)


def token_bucket_bytes(rate_bits: int) -> int:
    """Bucket size for tbf: about 1 ms of traffic at the link rate, at least 32 KiB.

    Smaller buckets make small messages pay their serialisation time as on a real link, but below
    roughly rate/1000 the qdisc's timer wake-ups can no longer keep the link busy (1gbit would then
    run well under its rate); 32 KiB keeps two full-size TCP segments plus headers in one bucket.
    """
    return max(32 * 1024, rate_bits // 8 // 1000)


def check_prerequisites(need_iptables: bool = False) -> None:
    """Raise :class:`ClusterError` with a plain explanation when namespaces cannot work here."""
    if os.geteuid() != 0:
        raise ClusterError("the emulated cluster needs root (network namespaces and tc); run it as root or with sudo")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ClusterError(f"missing {' and '.join(missing)}: install iproute2 (apt-get install iproute2)")
    if need_iptables:
        ensure_iptables()


def ensure_iptables() -> None:
    """Packet loss needs iptables' ``statistic`` match; install the Debian package if it is absent."""
    if shutil.which("iptables"):
        return
    apt = shutil.which("apt-get")
    if apt is None:
        raise ClusterError("packet loss needs iptables, which is missing and apt-get is not available to install it")
    print("emulated cluster: installing iptables (needed for --loss) with apt-get ...", flush=True)
    result = subprocess.run([apt, "install", "-y", "-q", "iptables"], capture_output=True, text=True)
    if result.returncode != 0 or shutil.which("iptables") is None:
        raise ClusterError(
            "packet loss needs iptables; `apt-get install -y iptables` failed:\n" + (result.stderr or result.stdout)[-2000:]
        )


def _run(argv: Sequence[str], what: str) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterError(f"{what} failed: `{' '.join(argv)}`: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


class EmulatedCluster:
    """``nodes`` emulated machines linked at ``rate`` with random packet ``loss`` (a fraction).

    A context manager: entering builds the namespaces and links, leaving stops every process still
    inside them and deletes everything (idempotent; also registered with :mod:`atexit` and, while the
    cluster is open in the main thread, run on SIGTERM/SIGHUP). ``rate=None`` leaves links unshaped.
    """

    def __init__(self, nodes: int = 2, rate: Optional[str] = "100mbit", loss: float = 0.0, *, name: Optional[str] = None) -> None:
        if nodes < 2 or nodes > 250:
            raise ClusterError(f"nodes must be between 2 and 250; got {nodes}")
        if not 0.0 <= loss < 1.0:
            raise ClusterError(f"loss is a fraction of packets in [0, 1); got {loss}")
        self.rate = rate
        self.rate_bits = parse_rate(rate) if rate is not None else None
        self.loss = loss
        self.name = name or f"gc{os.getpid()}x{next(_cluster_sequence)}"
        self.nodes = [
            Node(i, f"{self.name}n{i}", NODE_INTERFACE, f"{SUBNET}.{i + 1}") for i in range(nodes)
        ]
        self.switch_namespace = f"{self.name}sw" if nodes > 2 else None
        self._created: list[str] = []  # namespaces in creation order
        self._processes: list[subprocess.Popen] = []
        self._previous_handlers: dict[int, Any] = {}
        self._closed = True

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> "EmulatedCluster":
        self.start()
        return self

    def __exit__(self, kind: Optional[type], value: Optional[BaseException], traceback: Optional[TracebackType]) -> None:
        self.close()

    def start(self) -> None:
        """Build namespaces, links, addresses, shaping and loss; on any failure undo what was built."""
        check_prerequisites(need_iptables=self.loss > 0)
        self._closed = False
        atexit.register(self.close)
        self._install_signal_handlers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop processes left in the namespaces, then delete the namespaces (and with them the links)."""
        if self._closed:
            return
        self._closed = True
        try:
            with signals_deferred():  # a second Ctrl-C must not interrupt the clean-up itself
                try:
                    self._stop_processes()
                finally:
                    for namespace in reversed(self._created):
                        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
                    self._created.clear()
        finally:
            self._restore_signal_handlers()
            atexit.unregister(self.close)

    # ------------------------------------------------------------------ using the nodes
    def exec(
        self,
        node: Union[int, Node],
        argv: Sequence[str],
        *,
        env: Optional[Mapping[str, str]] = None,
        stdout: Union[int, IO[Any], None] = None,
        stderr: Union[int, IO[Any], None] = None,
        cwd: Optional[str] = None,
    ) -> subprocess.Popen:
        """Start ``argv`` inside ``node``'s namespace (in a new process group via setsid, so a terminal's Ctrl-C
        reaches this process, which then cleans up, instead of half of the workers)."""
        target = self._node(node)
        process = subprocess.Popen(
            ["ip", "netns", "exec", target.namespace, *argv],
            env=dict(env) if env is not None else None,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            start_new_session=True,
        )
        self._processes.append(process)
        return process

    def run(self, node: Union[int, Node], argv: Sequence[str], *, timeout: Optional[float] = None) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``node``'s namespace to completion and capture its output (text)."""
        target = self._node(node)
        return subprocess.run(["ip", "netns", "exec", target.namespace, *argv], capture_output=True, text=True, timeout=timeout)

    def nic_bytes(self) -> list[dict[str, int]]:
        """Kernel byte counters of every node's interface: ``[{"tx_bytes": .., "rx_bytes": ..}, ...]``.

        These count what the interface carried, IP and TCP headers included (one header per
        segment-offload super-packet: veths hand 64 KiB TCP segments through unsplit).
        """
        counters = []
        for node in self.nodes:
            directory = f"/sys/class/net/{node.interface}/statistics"
            text = _run(["ip", "netns", "exec", node.namespace, "cat", f"{directory}/tx_bytes", f"{directory}/rx_bytes"],
                        f"reading the byte counters of node {node.index}")
            tx_bytes, rx_bytes = (int(value) for value in text.split())
            counters.append({"tx_bytes": tx_bytes, "rx_bytes": rx_bytes})
        return counters

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this cluster owns (nodes and switch), whether or not it exists yet."""
        names = [node.namespace for node in self.nodes]
        return names + ([self.switch_namespace] if self.switch_namespace else [])

    # ------------------------------------------------------------------ plumbing
    def _node(self, node: Union[int, Node]) -> Node:
        if self._closed:
            raise ClusterError("the emulated cluster is not running (use it inside its `with` block)")
        return self.nodes[node] if isinstance(node, int) else node

    def _add_namespace(self, namespace: str) -> None:
        with signals_deferred():  # created and recorded, or neither: an interrupt in between would leak it
            result = subprocess.run(["ip", "netns", "add", namespace], capture_output=True, text=True)
            if result.returncode == 0:
                self._created.append(namespace)
        if result.returncode != 0:
            raise ClusterError(
                f"cannot create network namespace {namespace}: {result.stderr.strip()} "
                "(inside a container this needs CAP_SYS_ADMIN, e.g. docker run --privileged)"
            )
        # IPv6 would add neighbour-discovery chatter to the byte counters; the cluster speaks IPv4.
        for key in ("all", "default"):
            setting = f"net.ipv6.conf.{key}.disable_ipv6=1"
            subprocess.run(["ip", "netns", "exec", namespace, "sysctl", "-qw", setting], capture_output=True)
        _run(["ip", "-n", namespace, "link", "set", "lo", "up"], f"loopback up in {namespace}")

    def _shape(self, namespace: str, interface: str) -> None:
        if self.rate_bits is None:
            return
        burst = token_bucket_bytes(self.rate_bits)
        _run(
            ["tc", "-n", namespace, "qdisc", "add", "dev", interface, "root", "tbf",
             "rate", f"{self.rate_bits}bit", "burst", str(burst), "latency", QUEUE_LATENCY],
            f"rate limit on {namespace}/{interface}",
        )

    def _build(self) -> None:
        for node in self.nodes:
            self._add_namespace(node.namespace)
        if self.switch_namespace is not None:
            self._add_namespace(self.switch_namespace)
            _run(["ip", "-n", self.switch_namespace, "link", "add", "br0", "type", "bridge"], "bridge")
            _run(["ip", "-n", self.switch_namespace, "link", "set", "br0", "up"], "bridge up")
            for node in self.nodes:
                port = f"port{node.index}"
                _run(["ip", "link", "add", "name", node.interface, "netns", node.namespace, "type", "veth",
                      "peer", "name", port, "netns", self.switch_namespace], f"link of node {node.index}")
                _run(["ip", "-n", self.switch_namespace, "link", "set", port, "master", "br0"], f"bridge port {port}")
                _run(["ip", "-n", self.switch_namespace, "link", "set", port, "up"], f"bridge port {port} up")
                self._shape(self.switch_namespace, port)
        else:
            first, second = self.nodes
            _run(["ip", "link", "add", "name", first.interface, "netns", first.namespace, "type", "veth",
                  "peer", "name", second.interface, "netns", second.namespace], "link between the two nodes")
        for node in self.nodes:
            _run(["ip", "-n", node.namespace, "addr", "add", f"{node.address}/{PREFIX_LENGTH}", "dev", node.interface],
                 f"address of node {node.index}")
            _run(["ip", "-n", node.namespace, "link", "set", node.interface, "up"], f"interface of node {node.index} up")
            self._shape(node.namespace, node.interface)
            if self.loss > 0:
                _run(["ip", "netns", "exec", node.namespace, "iptables", "-A", "INPUT", "-m", "statistic",
                      "--mode", "random", "--probability", repr(self.loss), "-j", "DROP"], f"packet loss on node {node.index}")

    def _stop_processes(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM, then SIGKILL, every process this cluster started and every process still inside
        its namespaces (workers whose launcher died): all of them were started by this cluster."""
        for process in self._processes:
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for process in self._processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        self._processes.clear()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = self._pids_inside()
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5.0
            while self._pids_inside() and time.monotonic() < deadline:
                time.sleep(0.1)

    def _pids_inside(self) -> list[int]:
        pids: list[int] = []
        for namespace in self._created:
            result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
            pids.extend(int(token) for token in result.stdout.split() if token.isdigit())
        return [pid for pid in pids if pid != os.getpid()]

    def _install_signal_handlers(self) -> None:
        """Turn SIGTERM/SIGHUP into SystemExit so ``with`` blocks and ``finally`` clauses run (SIGINT
        already raises KeyboardInterrupt). Only where Python allows it and nobody else handles them."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                self._previous_handlers[sig] = signal.signal(sig, _exit_on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back while the body runs, then deliver the first one that came.

    Python handlers run in the main thread between bytecodes, so an interrupt can otherwise land
    between "namespace created" and "namespace recorded", or in the middle of the clean-up.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])


def _exit_on_signal(signum: int, frame: Optional[FrameType]) -> None:
    raise SystemExit(128 + signum)


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group (made by setsid) a cluster process was started in."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass

