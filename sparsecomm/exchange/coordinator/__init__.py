"""The ZeroMQ coordinator: aggregates workers' sparse deltas, owns the canonical weights version,
and streams aggregates to trainers and rollout (inference) workers.

    sparsecomm coordinator --bind tcp://127.0.0.1:5555 --quorum 1.0 --deadline-s 10 \\
        --checkpoint-dir runs/coord --metrics-port 9500 [--curve-secret-key server.key_secret \\
        --allow-keys clients/]          # a non-loopback --bind needs CURVE, or --insecure

One process, one ROUTER socket, one poll loop (protocol: ../protocol.py). Per round the
coordinator collects one push per trainer, closes the round when every live trainer has
pushed - or, once `deadline_s` has passed since the round's first push, when at least
`quorum` x live trainers have (the first round also waits for `min_trainers` to join) - and then
averages, optionally re-sparsifies, applies, extends the hash chain, journals the round and
sends the aggregate to every trainer and the changes to rollout workers (a full `anchor` every
`anchor_every` versions; a checkpoint every `checkpoint_every` rounds).

    sparsecomm coordinator --relay --bind tcp://127.0.0.1:5555   # ZeRO-3 ranks -> rollout workers

Relay mode (relay.py) has no trainers: ZeRO-3 ranks ("publishers") send the changed bf16 entries
of their own partitions, and each version, once every rank's patch is in, goes to rollout workers.

Faults: a trainer silent for `heartbeat_timeout_s` is dropped from the live set (so a killed
worker stalls a round at most that long, or `deadline_s` with a quorum below 1), even under a
flood of junk; it can rejoin and resync (replayed aggregates if still retained, else a chunked
snapshot). A re-sent push is answered idempotently. A restart resumes at the last version any
worker saw (checkpoint + journal), so no delta is lost. Bad input is answered with an `error`
reply and counted by reason; the coordinator never crashes and state changes only after a
message has been fully validated. Memory is bounded: weights (4 B/param), optional residual
and bf16 view, at most one pending and one late delta per trainer, the last `retain`
aggregate payloads, and per message a small multiple of its size.

Modules, one job each:
    config.py      CoordinatorConfig (the CLI is derived from it)
    server.py      Coordinator: socket, poll loop, limits, dispatch, membership
    rounds.py      pushes, late deltas, closing a round, idempotent re-pushes
    rollout.py     publishing to rollout workers
    relay.py       relay mode (--relay): ZeRO-3 ranks' partition patches assembled into versions
    state.py       State and Aggregate (what is checkpointed)
    checkpoint.py  checkpoint and journal files
    metrics.py     Prometheus metrics
    cli.py         `sparsecomm coordinator`
"""
from .cli import add_arguments, config_from_args, run
from .config import CoordinatorConfig, is_loopback
from .server import Coordinator

__all__ = ["Coordinator", "CoordinatorConfig", "add_arguments", "config_from_args", "is_loopback", "run"]
