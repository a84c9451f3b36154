"""Run launch/train.py on an emulated multi-node cluster on this one machine, and measure the wire.

    python launch/cluster.py --nodes 2 --rate 100mbit [--loss 0.01] [--nproc-per-node 1] [--json run.json] \\
        -- --method powersgd --rank 4 --steps 100

Two nodes with two workers each (the workers of one node talk over the namespace's loopback,
unshaped, like GPUs of one machine; only traffic between nodes crosses the shaped link, and the NIC
counters count exactly that), gcomp's hierarchical path on or off (``--hierarchical on|off``)::

    python launch/cluster.py --nodes 2 --nproc-per-node 2 --rate 100mbit -- --method topk --hierarchical on --threads 1

Each node is a network namespace with its own interface (see ``launch/netns.py``); one ``torchrun``
per node joins a c10d rendezvous hosted on node 0 (10.200.0.1), exactly as on separate machines,
so every byte of gradient exchange between nodes crosses the rate-limited virtual link. The kernel's
tx/rx byte counters of every node's interface are read before and after the run, and printed next to
what gcomp says it handed to the network (``stats()`` of rank 0, from train.py's ``--json`` log), so
the compression ratio can be checked against real traffic, headers and all.

Needs root and iproute2 (``ip``, ``tc``); ``--loss`` needs iptables (installed with apt-get if absent).
Everything after ``--`` goes to launch/train.py. Exit status: 0 when every node's torchrun
exited 0, else 1 (2 when the cluster could not be built).

Reuse from Python (benchmarks, tests)::

    with EmulatedCluster(2, "100mbit") as cluster:
        run = run_training(cluster, ["--method", "powersgd", "--steps", "30"], log_dir="/tmp/run")
    run.exit_codes, run.nic, run.gcomp_stats(), run.train_records()
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import IO, Any, Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from netns import ClusterError, EmulatedCluster, Node  # noqa: E402

LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))
TRAIN_SCRIPT = os.path.join(LAUNCH_DIR, "train.py")
RENDEZVOUS_PORT = 29400  # free by construction: nothing else listens inside a fresh namespace
MAX_NODES = 9  # torchrun orders nodes by address *string*; 10.200.0.10 would sort before .2
GCOMP_KEYS = ("bytes_sent", "bytes_received", "bytes_uncompressed", "compression_ratio", "path", "links")


@dataclass
class NodeTraffic:
    """What one node's interface carried during the run (counter deltas, headers included)."""

    node: int
    address: str
    interface: str
    tx_bytes: int
    rx_bytes: int


@dataclass
class ClusterRun:
    """The outcome of one distributed run on the emulated cluster."""

    nodes: int
    nproc_per_node: int
    rate: Optional[str]
    rate_bits_per_second: Optional[int]
    loss: float
    train_args: list[str]
    exit_codes: list[Optional[int]]
    wall_seconds: float
    nic: list[NodeTraffic]
    train_log: str
    node_logs: list[str]
    train_log_offset: int = 0  # train.py appends: records before this byte belong to earlier runs
    timed_out: bool = False

    @property
    def succeeded(self) -> bool:
        return not self.timed_out and all(code == 0 for code in self.exit_codes)

    def train_records(self) -> list[dict[str, Any]]:
        """The JSON records rank 0 logged during this run (step, loss, validation_loss, seconds, ...)."""
        if not os.path.exists(self.train_log):
            return []
        with open(self.train_log, encoding="utf-8") as handle:
            handle.seek(self.train_log_offset)
            return [json.loads(line) for line in handle if line.strip()]

    def gcomp_stats(self) -> dict[str, Any]:
        """Rank 0's cumulative gcomp counters at the last logged step (empty for non-gcomp methods).
        ``steps`` is the step count: train.py syncs gradients on every step."""
        records = self.train_records()
        if not records or "bytes_sent" not in records[-1]:
            return {}
        last = records[-1]
        return {"steps": last["step"], **{key: last[key] for key in GCOMP_KEYS if key in last}}

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["succeeded"] = self.succeeded
        out["gcomp"] = self.gcomp_stats()
        records = self.train_records()
        out["final_record"] = records[-1] if records else None
        return out


def json_log_argument(train_args: Sequence[str]) -> Optional[str]:
    """The ``--json`` path already among train.py's arguments, if any."""
    for index, argument in enumerate(train_args):
        if argument == "--json" and index + 1 < len(train_args):
            return train_args[index + 1]
        if argument.startswith("--json="):
            return argument.split("=", 1)[1]
    return None


def torchrun_command(node: Node, host: Node, nodes: int, nproc_per_node: int, run_id: str,
                     train_args: Sequence[str], join_timeout: float) -> list[str]:
    """One node's torchrun invocation.

    ``--local-addr`` and ``is_host`` are both needed: all namespaces share the machine's hostname, so
    torchrun cannot work out by itself which node hosts the c10d store, and would advertise an
    address the other nodes cannot reach.
    """
    is_host = 1 if node.index == host.index else 0
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(nodes),
        "--nproc-per-node", str(nproc_per_node),
        "--node-rank", str(node.index),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"{host.address}:{RENDEZVOUS_PORT}",
        "--rdzv-id", run_id,
        "--rdzv-conf", f"is_host={is_host},join_timeout={int(join_timeout)}",
        "--local-addr", node.address,
        "--max-restarts", "0",
        TRAIN_SCRIPT, *train_args,
    ]


def _pump(stream: IO[bytes], log_path: str, prefix: Optional[str]) -> None:
    """Copy a node's output to its log file and, unless quiet, to our stdout with a node prefix."""
    with open(log_path, "wb") as log:
        for line in iter(stream.readline, b""):
            log.write(line)
            log.flush()
            if prefix is not None:
                sys.stdout.write(prefix + line.decode("utf-8", "replace"))
                sys.stdout.flush()


def run_training(
    cluster: EmulatedCluster,
    train_args: Sequence[str],
    *,
    nproc_per_node: int = 1,
    log_dir: Optional[str] = None,
    quiet: bool = False,
    timeout: Optional[float] = None,
    failure_grace: float = 30.0,
    join_timeout: float = 120.0,
    monitor: Optional[Callable[[float], None]] = None,
    poll_interval: float = 0.2,
) -> ClusterRun:
    """Run train.py with ``train_args`` on every node of ``cluster`` and collect the measurements.

    If one node fails, the others get ``failure_grace`` seconds to notice before they are stopped
    (a surviving worker would otherwise wait in a collective for gloo's 30-minute timeout).
    ``monitor(seconds_since_launch)`` is called every ``poll_interval`` seconds while the nodes run
    (the benchmark samples the NIC counters there as the training log grows).
    """
    nodes = len(cluster.nodes)
    if nodes > MAX_NODES:
        raise ClusterError(
            f"at most {MAX_NODES} nodes: torchrun ranks nodes by address string, so node 9 (10.200.0.10) would become rank 1"
        )
    log_dir = log_dir or tempfile.mkdtemp(prefix=f"{cluster.name}-")
    os.makedirs(log_dir, exist_ok=True)
    train_args = list(train_args)
    train_log = json_log_argument(train_args)
    if train_log is None:
        train_log = os.path.join(log_dir, "train_log.jsonl")
        train_args += ["--json", train_log]
    train_log = os.path.abspath(train_log)
    offset = os.path.getsize(train_log) if os.path.exists(train_log) else 0

    host = cluster.nodes[0]
    before = cluster.nic_bytes()
    started = time.perf_counter()
    processes, pumps, node_logs = [], [], []
    for node in cluster.nodes:
        environment = {
            **os.environ,
            "GLOO_SOCKET_IFNAME": node.interface,  # gloo would otherwise pick an interface by hostname
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        command = torchrun_command(node, host, nodes, nproc_per_node, cluster.name, train_args, join_timeout)
        process = cluster.exec(node, command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               cwd=os.path.dirname(LAUNCH_DIR))
        log_path = os.path.join(log_dir, f"node{node.index}.log")
        prefix = None if quiet else f"[node {node.index}] "
        pump = threading.Thread(target=_pump, args=(process.stdout, log_path, prefix), daemon=True)
        pump.start()
        processes.append(process)
        pumps.append(pump)
        node_logs.append(log_path)

    timed_out = False
    first_failure: Optional[float] = None
    while any(process.poll() is None for process in processes):
        now = time.perf_counter()
        if first_failure is None and any(process.poll() not in (None, 0) for process in processes):
            first_failure = now
        if timeout is not None and now - started > timeout:
            timed_out = True
            break
        if first_failure is not None and now - first_failure > failure_grace:
            break
        if monitor is not None:
            monitor(now - started)
        time.sleep(poll_interval)
    for process in processes:
        if process.poll() is None:
            process.terminate()  # ip netns exec execs torchrun, which stops its workers on SIGTERM
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    wall = time.perf_counter() - started
    for pump in pumps:
        pump.join(timeout=5)
    after = cluster.nic_bytes()

    traffic = [
        NodeTraffic(node.index, node.address, node.interface,
                    after[node.index]["tx_bytes"] - before[node.index]["tx_bytes"],
                    after[node.index]["rx_bytes"] - before[node.index]["rx_bytes"])
        for node in cluster.nodes
    ]
    return ClusterRun(
        nodes=nodes, nproc_per_node=nproc_per_node, rate=cluster.rate, rate_bits_per_second=cluster.rate_bits,
        loss=cluster.loss, train_args=train_args, exit_codes=[process.returncode for process in processes],
        wall_seconds=wall, nic=traffic, train_log=train_log, node_logs=node_logs, train_log_offset=offset,
        timed_out=timed_out,
    )


def describe(run: ClusterRun) -> str:
    """A short human summary: exit codes, time, wire bytes per node, and gcomp's own count."""
    lines = [
        f"emulated cluster: {run.nodes} nodes x {run.nproc_per_node} processes, link {run.rate or 'unshaped'}"
        + (f", loss {run.loss:.2%}" if run.loss else ""),
        f"exit codes {run.exit_codes}{' (timed out)' if run.timed_out else ''}, wall time {run.wall_seconds:.1f} s",
    ]
    for node in run.nic:
        lines.append(f"  node {node.node} ({node.address} {node.interface}): "
                     f"tx {node.tx_bytes / 1e6:.3f} MB, rx {node.rx_bytes / 1e6:.3f} MB")
    stats = run.gcomp_stats()
    if stats:
        sent = stats["bytes_sent"]
        ratio = run.nic[0].tx_bytes / sent if sent else float("nan")
        lines.append(
            f"  gcomp rank 0: {stats['steps']} steps, payload sent {sent / 1e6:.3f} MB "
            f"(uncompressed {stats['bytes_uncompressed'] / 1e6:.3f} MB); node 0 NIC tx / payload = {ratio:.2f}"
        )
    for kind, counters in sorted(stats.get("links", {}).items()):
        lines.append(f"  gcomp rank 0, {stats.get('path', 'flat')} path, {kind} collectives: "
                     f"sent {counters['bytes_sent'] / 1e6:.3f} MB, received {counters['bytes_received'] / 1e6:.3f} MB")
    lines.append(f"  train log: {run.train_log}; node logs: {os.path.dirname(run.node_logs[0]) if run.node_logs else '-'}")
    return "\n".join(lines)


def split_passthrough(argv: Optional[Sequence[str]] = None) -> tuple[list[str], list[str]]:
    """Split a command line at its first ``--``: (own arguments, arguments for launch/train.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    split = argv.index("--")
    return argv[:split], argv[split + 1:]


def parse_arguments(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    argv, train_args = split_passthrough(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2, help=f"emulated machines (2..{MAX_NODES})")
    parser.add_argument("--rate", default="100mbit",
                        help="link rate per node and direction, tc syntax (100mbit, 1gbit); 'none': unshaped")
    parser.add_argument("--loss", type=float, default=0.0, help="fraction of incoming packets each node drops at random (e.g. 0.01)")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="torchrun workers per node")
    parser.add_argument("--json", default=None, help="write the run summary (NIC bytes, exit codes, gcomp stats, log paths) here")
    parser.add_argument("--log-dir", default=None,
                        help="directory for per-node logs and train.py's JSON log (default: a new temp dir)")
    parser.add_argument("--timeout", type=float, default=None, help="stop the run after this many seconds")
    parser.add_argument("--quiet", action="store_true", help="do not echo the nodes' output (it is still in the node logs)")
    return parser.parse_args(argv), train_args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, train_args = parse_arguments(argv)
    rate = None if args.rate.lower() == "none" else args.rate
    try:
        if not 2 <= args.nodes <= MAX_NODES:
            raise ClusterError(f"--nodes must be between 2 and {MAX_NODES}; got {args.nodes}")
        with EmulatedCluster(args.nodes, rate, args.loss) as cluster:
            print(f"emulated cluster {cluster.name}: " + ", ".join(f"node {n.index} = {n.address}" for n in cluster.nodes), flush=True)
            run = run_training(cluster, train_args, nproc_per_node=args.nproc_per_node, log_dir=args.log_dir,
                               quiet=args.quiet, timeout=args.timeout)
    except ClusterError as error:
        print(f"cluster.py: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cluster.py: interrupted; namespaces removed", file=sys.stderr)
        return 130
    print(describe(run), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(run.to_json(), handle, indent=2)
        print(f"summary written to {args.json}")
    return 0 if run.succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
