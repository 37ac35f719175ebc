"""CoordinatorConfig: every knob of the coordinator, written once. Each field carries its help
text in `metadata["help"]`; the `sparsecomm coordinator` CLI (cli.py) is derived from these
fields, so a new option is one new field here.

Validation happens at construction, with an error that says why - including the one safety
rule: a non-loopback bind without CURVE is refused unless `insecure` is set, because anyone
who can reach the port could then push deltas into everyone's weights.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


def _f(default, help: str, **extra):
    """A config field whose CLI help lives beside it."""
    return field(default=default, metadata={"help": help, **extra})


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// endpoints on a loopback address (127.0.0.0/8, ::1, localhost)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", a hostname or an interface name: reachable from outside
        return False


@dataclass
class CoordinatorConfig:
    bind: str = _f("tcp://127.0.0.1:5555", "ZeroMQ endpoint to bind")
    insecure: bool = _f(False, "allow a non-loopback bind without CURVE (only on a network you trust)")
    min_trainers: int = _f(1, "the first round waits until this many trainers have joined this process (a start barrier)")
    quorum: float = _f(1.0, "fraction of live trainers that closes a round once the deadline passed")
    deadline_s: float = _f(10.0, "seconds after a round's first push before a quorum may close it")
    late: str = _f("fold", "deltas that miss their round: fold them into the next round, or drop them",
                   choices=("fold", "drop"))
    heartbeat_timeout_s: float = _f(5.0, "a trainer silent this long is dropped from the live set")
    resparsify_density: float = _f(0.0, "send top-k of the mean with coordinator-side error feedback (0: the exact mean)")
    value_codec: str = _f("fp32", "value codec of aggregates (every replica applies the decoded payload)")
    retain: int = _f(64, "aggregates kept for replay to workers that fell behind")
    anchor_every: int = _f(0, "full weights to rollout workers every N versions (0: only on join)")
    rollout_bf16: bool = _f(True, "rollout workers get the exact bf16 changes (lossless for a bf16 copy); "
                                  "--no-rollout-bf16 sends the fp32 delta")
    relay: bool = _f(False, "relay mode: assemble ZeRO-3 ranks' partition patches (role publisher) into versions "
                            "for rollout workers, instead of aggregating trainers' deltas (coordinator/relay.py)")
    relay_max_ahead: int = _f(4, "relay mode: versions a publisher may run ahead of the slowest rank")
    relay_max_numel: int = _f(1 << 34, "relay mode: the largest model (entries) a publisher may announce; the relay "
                                       "holds a bf16 copy of it (2 B per entry)")
    checkpoint_dir: str | None = _f(None, "directory for the checkpoint and the round journal (None: no durability)")
    checkpoint_every: int = _f(10, "rounds between full checkpoints")
    journal: bool = _f(True, "append every aggregate to CHECKPOINT_DIR/journal.bin before sending it, so a "
                             "restart resumes at the last version any worker saw (needs checkpoint_dir)")
    journal_fsync: bool = _f(True, "fsync each journal record (survives a machine crash, not just a process kill)")
    metrics_port: int | None = _f(None, "Prometheus endpoint port (None: off)")
    metrics_addr: str = _f("127.0.0.1", "address of the Prometheus endpoint")
    max_frame_bytes: int = _f(1 << 30, "largest message accepted (all frames); zmq drops larger ones unread")
    max_abs_value: float = _f(1e4, "refuse deltas with a larger entry (a lie or a bug)")
    curve_secret_key: str | None = _f(None, "server certificate (.key_secret) from `sparsecomm keys`")
    allow_keys: str | None = _f(None, "directory of allowed client public keys; NAME.key may join only as worker NAME")
    max_messages_per_poll: int = _f(256, "messages handled between two timer ticks (deadlines, heartbeats)")
    peer_error_rate_per_s: float = _f(20.0, "refused messages a connection may cause per second (sustained)")
    peer_error_burst: int = _f(100, "refused messages a connection may cause in a burst; beyond the budget its "
                                    "messages are dropped unread")
    poll_ms: int = _f(50, "poll timeout of the main loop (timer resolution when idle)")

    def __post_init__(self):
        if self.min_trainers < 1:
            raise ValueError(f"min_trainers must be >= 1, got {self.min_trainers}")
        if not 0 < self.quorum <= 1:
            raise ValueError(f"quorum must be in (0, 1], got {self.quorum}")
        if self.late not in ("fold", "drop"):
            raise ValueError(f"late must be 'fold' or 'drop', got {self.late!r}")
        if self.deadline_s <= 0 or self.heartbeat_timeout_s <= 0 or self.retain < 1 or self.checkpoint_every < 1:
            raise ValueError("deadline_s and heartbeat_timeout_s must be > 0; retain and checkpoint_every >= 1")
        if not 0 <= self.resparsify_density < 1:
            raise ValueError(f"resparsify_density must be in [0, 1), got {self.resparsify_density}")
        if self.relay and self.checkpoint_dir:
            raise ValueError("relay mode keeps no checkpoint (publishers re-anchor after a restart): drop checkpoint_dir")
        if self.relay_max_ahead < 1 or self.relay_max_numel < 1:
            raise ValueError(f"relay_max_ahead and relay_max_numel must be >= 1, got {self.relay_max_ahead}, "
                             f"{self.relay_max_numel}")
        if (self.curve_secret_key is None) != (self.allow_keys is None):
            raise ValueError("CURVE needs both curve_secret_key and allow_keys")
        if self.max_messages_per_poll < 1 or self.peer_error_burst < 1 or self.peer_error_rate_per_s <= 0:
            raise ValueError("max_messages_per_poll and peer_error_burst must be >= 1, peer_error_rate_per_s > 0")
        if self.curve_secret_key is None and not self.insecure and not is_loopback(self.bind):
            raise ValueError(f"refusing to bind {self.bind} without CURVE: anyone who reaches it could push deltas "
                             "into every replica. Give curve_secret_key and allow_keys (`sparsecomm keys`), bind "
                             "a loopback address, or set insecure=True (--insecure) on a network you trust")
