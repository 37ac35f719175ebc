"""The coordinator's relay mode (coordinator/relay.py): ZeRO-3-style publishers, each owning a
contiguous partition of every tensor, send exact bf16 patches; rollout workers reassemble the
full bf16 model bit for bit. Hostile or confused publishers are refused with the reason while the
relay keeps serving. Real ZeroMQ sockets on loopback; the coordinator runs in a thread here.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/integration/test_coordinator_relay.py
"""
from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from sparsecomm import SparseDelta
from sparsecomm.codec import encode_model
from sparsecomm.exchange import CoordinatorConfig, CoordinatorError
from sparsecomm.exchange.coordinator.relay import layout_fingerprint
from sparsecomm.exchange.zmq_client import PublisherClient, RolloutClient
from tests.integration.coordinator_helpers import running_coordinator

pytestmark = pytest.mark.distributed
SHAPES = {"emb.weight": (13, 8), "h.0.w": (8, 8), "h.0.b": (8,), "tiny": (2,), "head.w": (8, 5)}
NUMEL = sum(math.prod(s) for s in SHAPES.values())
FP = layout_fingerprint(SHAPES.items())


class Model:
    """A full bf16 model and its ZeRO-3 partitions: rank r owns [r*ceil(n/P), (r+1)*ceil(n/P)) of each tensor."""

    def __init__(self, ranks: int, seed: int = 0):
        self.ranks, self.g = ranks, torch.Generator().manual_seed(seed)
        self.t = {n: torch.randn(math.prod(s), generator=self.g).to(torch.bfloat16) for n, s in SHAPES.items()}
        self.last: dict[int, dict[str, torch.Tensor]] = {}

    def part(self, name: str, rank: int) -> tuple[int, int]:
        n = math.prod(SHAPES[name])
        p = math.ceil(n / self.ranks)
        return min(n, rank * p), min(n, rank * p + p)

    def step(self, frac: float = 0.2) -> None:
        for t in self.t.values():
            m = torch.rand(t.numel(), generator=self.g) < frac
            t[m] = (t[m].float() + 0.5).to(torch.bfloat16)

    def patch(self, rank: int, anchor: bool = False, **override) -> bytes:
        """This rank's patch: its partition's entries whose bf16 bits changed since its last patch."""
        deltas, last = {}, self.last.setdefault(rank, {})
        for name, shape in SHAPES.items():
            lo, hi = self.part(name, rank)
            cur = self.t[name][lo:hi].clone()
            if anchor or name not in last:
                idx = torch.arange(cur.numel())
            else:
                idx = (cur.view(torch.int16) != last[name].view(torch.int16)).nonzero().view(-1)
            last[name] = cur
            deltas[name] = SparseDelta(idx + lo, cur[idx], shape, torch.bfloat16)
        deltas.update(override)
        return encode_model(deltas, "auto", "bf16")

    def flat(self) -> torch.Tensor:
        return torch.cat(list(self.t.values()))


def publishers(endpoint, ranks, **kw):
    out = []
    for r in range(ranks):
        c = PublisherClient(endpoint, f"zero3-rank{r}", timeout_s=kw.get("timeout_s", 10), heartbeat_s=0.1)
        assert c.join(FP, NUMEL, r, ranks) == 1
        out.append(c)
    return out


def rollout(endpoint, name):
    c = RolloutClient(endpoint, name, FP, NUMEL, timeout_s=10, heartbeat_s=0.1)
    c.connect()
    return c


def assert_late_joiner_holds(endpoint, flat, version, *close):
    """A rollout worker joining now gets exactly `flat` at `version` (a bf16 snapshot); then every client
    in `close` and it are closed."""
    r = rollout(endpoint, "rollout")
    assert r.version == version and torch.equal(r.weights, flat)
    for c in (*close, r):
        c.close()


def poll_until(client, version, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while client.version < version:
        assert time.monotonic() < deadline, f"{client.conn.worker} stuck at version {client.version}"
        client.poll(0.2)


def test_rollout_workers_reassemble_the_full_bf16_model_from_partition_patches():
    ranks, m = 3, Model(3)
    with running_coordinator(relay=True, anchor_every=3) as coord:
        with pytest.raises(CoordinatorError, match="not_ready"):  # no complete version yet
            rollout(coord.endpoint, "early")
        pubs = publishers(coord.endpoint, ranks)
        for r, p in enumerate(pubs):
            p(m.patch(r), 1, r)
        a = rollout(coord.endpoint, "rollout-a")  # joins at version 1: a bf16 snapshot
        assert a.version == 1 and torch.equal(a.weights, m.flat())
        for v in range(2, 7):
            m.step()
            for r in reversed(range(ranks)):  # arrival order does not matter
                pubs[r](m.patch(r), v, r)
            poll_until(a, v)
            assert torch.equal(a.weights, m.flat()), v  # bit for bit after every version
            if v == 4:
                b = rollout(coord.endpoint, "rollout-b")  # a late joiner
        poll_until(b, 6)
        assert torch.equal(b.weights, m.flat()) and b.hash == a.hash == coord.state.hash
        assert a.updates == 5  # versions 2..6 as patches (anchors at 3 and 6 replace nothing that differs)
        assert coord.relay.published_bytes > 0
        for c in [*pubs, a, b]:
            c.close()


def test_publishers_that_lie_or_confuse_are_refused_and_the_relay_keeps_serving():
    ranks, m = 2, Model(2, seed=1)
    with running_coordinator(relay=True) as coord:
        p0, p1 = publishers(coord.endpoint, ranks)
        lo, hi = m.part("h.0.w", 1)
        p0(m.patch(0, anchor=True), 1, 0)
        w = m.t["h.0.w"]
        for bad_idx in (torch.arange(lo - 1, hi), torch.tensor([lo, lo + 2]), torch.arange(lo, hi - 1)):
            # an anchor over one of rank 0's entries, one with a hole, one that leaves an entry unowned
            with pytest.raises(CoordinatorError, match=r"must cover exactly its partition \[32, 64\)"):
                p1(m.patch(1, anchor=True, **{"h.0.w": SparseDelta(bad_idx, w[bad_idx], SHAPES["h.0.w"],
                                                                     torch.bfloat16)}), 1, 1)
        with pytest.raises(CoordinatorError, match="relay patches carry bf16 tensors"):
            p1(m.patch(1, anchor=True, **{"h.0.w": SparseDelta(torch.arange(lo, hi), w[lo:hi].float(),
                                                                 SHAPES["h.0.w"], torch.float32)}), 1, 1)
        with pytest.raises(CoordinatorError, match="bad_payload"):  # not a codec message
            p1(b"\x00" * 64, 1, 1)
        with pytest.raises(CoordinatorError, match="stale"):  # out of sequence
            p1(m.patch(1, anchor=True), 2, 1)
        wrong = {**{n: SparseDelta(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bfloat16), s, torch.bfloat16)
                    for n, s in SHAPES.items()}, "extra": SparseDelta(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bfloat16),
                                                                       (3,), torch.bfloat16)}
        with pytest.raises(CoordinatorError, match="shape_mismatch"):  # a different layout
            p1(encode_model(wrong, "auto", "bf16"), 1, 1)
        with pytest.raises(CoordinatorError, match="duplicate"):  # a second publisher for rank 1
            PublisherClient(coord.endpoint, "impostor", timeout_s=5).join(FP, NUMEL, 1, ranks)
        with pytest.raises(CoordinatorError, match="ranks=3"):
            PublisherClient(coord.endpoint, "other", timeout_s=5).join(FP, NUMEL, 2, 3)
        assert coord.state.version == 0 and not coord.relay.by_rank[1].pending  # nothing refused was kept
        p1(m.patch(1, anchor=True), 1, 1)  # the honest anchor still completes version 1
        assert coord.state.version == 1
        m.step()
        with pytest.raises(CoordinatorError, match="outside its partition"):  # rank 1 writing rank 0's entries
            lo0, hi0 = m.part("emb.weight", 0)
            p1(m.patch(1, **{"emb.weight": SparseDelta(torch.tensor([lo0]), m.t["emb.weight"][:1],
                                                         SHAPES["emb.weight"], torch.bfloat16)}), 2, 1)
        with pytest.raises(CoordinatorError, match="outside its partition"):  # past its range's end
            p0(m.patch(0, **{"head.w": SparseDelta(torch.tensor([m.part("head.w", 1)[0]]), m.t["head.w"][:1],
                                                     SHAPES["head.w"], torch.bfloat16)}), 2, 0)
        m.last.clear()  # the refused patches were not applied: resend whole partitions (always valid)
        p0(m.patch(0, anchor=True), 2, 0)
        p1(m.patch(1, anchor=True), 2, 1)
        assert_late_joiner_holds(coord.endpoint, m.flat(), 2, p0, p1)


def test_a_fast_rank_waits_for_a_slow_one_and_a_restarted_rank_re_anchors():
    ranks, m = 2, Model(2, seed=2)
    with running_coordinator(relay=True, relay_max_ahead=2) as coord:
        p0, p1 = publishers(coord.endpoint, ranks)
        views = []
        for v in range(1, 4):  # rank 0 runs ahead: versions 1, 2 accepted; 3 waits for rank 1
            views.append((m.patch(0), m.patch(1)))
            m.step()
        p0(views[0][0], 1, 0)
        p0(views[1][0], 2, 0)
        done = threading.Event()
        t = threading.Thread(target=lambda: (p0(views[2][0], 3, 0), done.set()), daemon=True)
        t.start()
        time.sleep(0.3)
        assert not done.is_set() and coord.state.version == 0  # held back (not_ready, retried)
        p1(views[0][1], 1, 1)
        t.join(10)
        assert done.is_set()
        p1(views[1][1], 2, 1)
        p1(views[2][1], 3, 1)
        assert coord.state.version == 3
        # rank 1 restarts (a new process, a new connection, same worker id): it is told the next
        # version and sends its whole partition for it; rank 0 carries on with plain patches
        p1.close()
        p1 = PublisherClient(coord.endpoint, "zero3-rank1", timeout_s=10, heartbeat_s=0.1)
        assert p1.join(FP, NUMEL, 1, ranks) == 4
        m.step()
        p0(m.patch(0), 4, 0)
        p1(m.patch(1, anchor=True), 4, 1)
        assert_late_joiner_holds(coord.endpoint, m.flat(), 4, p0, p1)


def test_relay_mode_refuses_what_does_not_belong_to_it():
    from sparsecomm.exchange import CoordinatorClient

    with pytest.raises(ValueError, match="relay mode keeps no checkpoint"):
        CoordinatorConfig(relay=True, checkpoint_dir="/tmp/x")
    with running_coordinator(relay=True) as coord:
        c = CoordinatorClient(coord.endpoint, "trainer-0", timeout_s=5)
        with pytest.raises(CoordinatorError, match="trainers push to a training coordinator"):
            c.join(FP, torch.zeros(NUMEL), lambda _: None, lambda _: None)
        c.close()
    with running_coordinator() as coord:  # a training coordinator
        with pytest.raises(CoordinatorError, match="--relay"):
            PublisherClient(coord.endpoint, "zero3-rank0", timeout_s=5).join(FP, NUMEL, 0, 1)


def test_a_rank_that_sent_its_last_patch_and_left_still_counts():
    """A rank may finish (send its final version, close) before the others send theirs: its acknowledged
    patch must complete the version with them (it did not, once: leave dropped it and the relay stalled)."""
    ranks, m = 2, Model(2, seed=3)
    with running_coordinator(relay=True) as coord:
        p0, p1 = publishers(coord.endpoint, ranks)
        p0(m.patch(0), 1, 0)
        p0.close()  # leave
        time.sleep(0.2)
        p1(m.patch(1), 1, 1)
        assert coord.state.version == 1
        assert_late_joiner_holds(coord.endpoint, m.flat(), 1, p1)


def test_a_stray_join_cannot_lock_the_real_job_out_and_the_model_size_is_capped():
    """What the first publisher fixes (world size, fingerprint, numel) is forgotten when every publisher left
    before version 1; an absurd numel is refused before anything is allocated."""
    with running_coordinator(relay=True, relay_max_numel=10 * NUMEL) as coord:
        with pytest.raises(CoordinatorError, match="exceeds relay_max_numel"):
            PublisherClient(coord.endpoint, "huge", timeout_s=5).join(FP, 1 << 40, 0, 2)
        stray = PublisherClient(coord.endpoint, "stray", timeout_s=5)
        stray.join("some-other-model", 7, 0, 3)
        with pytest.raises(CoordinatorError, match="fingerprint"):
            PublisherClient(coord.endpoint, "zero3-rank0", timeout_s=5).join(FP, NUMEL, 0, 2)
        stray.close()  # left before any version: forgotten
        time.sleep(0.2)
        ranks, m = 2, Model(2, seed=4)
        pubs = publishers(coord.endpoint, ranks)
        for r, p in enumerate(pubs):
            p(m.patch(r), 1, r)
        assert_late_joiner_holds(coord.endpoint, m.flat(), 1, *pubs)


def test_after_a_relay_restart_rollout_workers_are_told_and_reconnect():
    ranks, m = 2, Model(2, seed=5)
    with running_coordinator(relay=True) as coord:
        endpoint = coord.endpoint
        pubs = publishers(endpoint, ranks)
        for r, p in enumerate(pubs):
            p(m.patch(r), 1, r)
        ro = rollout(endpoint, "rollout")
        for p in pubs:
            p.close()
    with running_coordinator(relay=True, bind=endpoint) as coord:  # the same address, a fresh relay
        with pytest.raises(CoordinatorError, match="unknown_worker"):
            for _ in range(50):  # its heartbeats are answered unknown_worker
                ro.poll(0.1)
        pubs = publishers(endpoint, ranks)
        m.last.clear()
        m.step()
        for r, p in enumerate(pubs):  # the ranks re-anchor
            p(m.patch(r), 1, r)
        ro.connect()
        assert ro.version == 1 and torch.equal(ro.weights, m.flat())
        for c in (*pubs, ro):
            c.close()


class _Flaky:
    """A PublisherClient whose send fails once, without sending (a timed-out reply, a dead link)."""

    def __init__(self, client):
        self.client, self.fail_next = client, False

    def __call__(self, payload, version, rank):
        if self.fail_next:
            self.fail_next = False
            raise TimeoutError("simulated: no reply")
        return self.client(payload, version, rank)

    def rejoin(self):
        return self.client.rejoin()


def _fake_zero3_publisher(m: Model, rank: int, client):
    """Zero3RolloutPublisher over stand-ins for ZeRO-3 parameters (ds_tensor: the padded partition of m)."""
    from types import SimpleNamespace

    from sparsecomm.integrations.deepspeed import Zero3RolloutPublisher

    params = []
    for name, shape in SHAPES.items():
        n, part = math.prod(shape), math.ceil(math.prod(shape) / m.ranks)

        def detach(name=name, n=n, part=part):
            buf = torch.zeros(part, dtype=torch.bfloat16)
            lo, hi = m.part(name, rank)
            buf[:hi - lo] = m.t[name][lo:hi]
            return buf

        params.append((name, SimpleNamespace(ds_numel=n, ds_shape=shape, ds_tensor=SimpleNamespace(ds_numel=part,
                                                                                                      detach=detach))))
    module = SimpleNamespace(named_parameters=lambda: iter(params))
    engine = SimpleNamespace(zero_optimization_partition_weights=lambda: True, data_parallel_group=None, module=module)
    return Zero3RolloutPublisher(engine, client)


def _flaky_rank_worker(rank, world, endpoint):
    """Both ranks publish 5 steps of the same model; rank 1's send of step 2 fails once."""
    m = Model(world, seed=6)
    client = PublisherClient(endpoint, f"zero3-rank{rank}", timeout_s=30, heartbeat_s=0.1)
    pub = _fake_zero3_publisher(m, rank, _Flaky(client))
    pub.start_at(client.join(FP, NUMEL, rank, world) - 1)
    versions = []
    for step in range(1, 6):
        m.step()
        pub.send.fail_next = rank == 1 and step == 2
        versions.append(pub.publish()["version"])
    client.close()
    return {"versions": versions, "final": m.flat()}


def test_a_failed_send_re_anchors_every_rank_together(tmp_path):
    """One rank's send fails (its reply timed out): every rank learns it (an all-reduce over the group),
    all rejoin and send their whole partitions for the same version, so no version mixes the ranks'
    training steps (it did: the failed rank re-anchored alone, one step ahead of the others, for good)."""
    from tests.distributed.helpers import run_workers

    with running_coordinator(relay=True) as coord:
        out = run_workers(_flaky_rank_worker, 2, tmp_path, coord.endpoint)
        assert out[0]["versions"] == out[1]["versions"] == [1, 2, 3, 4, 5]
        assert_late_joiner_holds(coord.endpoint, out[0]["final"], 5)  # the model after step 5, whole
