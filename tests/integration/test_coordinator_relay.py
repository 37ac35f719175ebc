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


def poll_until(client, version, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while client.version < version:
        assert time.monotonic() < deadline, f"{client.conn.worker} stuck at version {client.version}"
        client.poll(0.2)


def test_rollout_workers_reassemble_the_full_bf16_model_from_partition_patches():
    ranks, m = 3, Model(3)
    with running_coordinator(relay=True, anchor_every=3) as coord:
        early = rollout(coord.endpoint, "early")  # before any publisher: version 0, all zeros
        assert early.version == 0 and not early.weights.any()
        pubs = publishers(coord.endpoint, ranks)
        for r, p in enumerate(pubs):
            p(m.patch(r), 1, r)
        poll_until(early, 1)
        assert torch.equal(early.weights, m.flat())  # version 1 as one patch of every nonzero entry
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
        for c in [*pubs, a, b, early]:
            c.close()


def test_publishers_that_lie_or_confuse_are_refused_and_the_relay_keeps_serving():
    ranks, m = 2, Model(2, seed=1)
    with running_coordinator(relay=True) as coord:
        p0, p1 = publishers(coord.endpoint, ranks)
        lo, hi = m.part("h.0.w", 1)
        p0(m.patch(0, anchor=True), 1, 0)
        # rank 1's anchor claiming one entry of rank 0's range
        with pytest.raises(CoordinatorError, match="overlaps"):
            p1(m.patch(1, anchor=True, **{"h.0.w": SparseDelta(torch.arange(lo - 1, hi), m.t["h.0.w"][lo - 1:hi],
                                                                 SHAPES["h.0.w"], torch.bfloat16)}), 1, 1)
        with pytest.raises(CoordinatorError, match="contiguous"):  # an anchor with a hole
            idx = torch.tensor([lo, lo + 2])
            p1(m.patch(1, anchor=True, **{"h.0.w": SparseDelta(idx, m.t["h.0.w"][idx], SHAPES["h.0.w"],
                                                                 torch.bfloat16)}), 1, 1)
        with pytest.raises(CoordinatorError, match="cover"):  # anchors that leave entries of a tensor unowned
            short = SparseDelta(torch.arange(lo, hi - 1), m.t["h.0.w"][lo:hi - 1], SHAPES["h.0.w"], torch.bfloat16)
            p1(m.patch(1, anchor=True, **{"h.0.w": short}), 1, 1)
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
        assert coord.state.version == 0  # nothing refused was kept
        p1(m.patch(1, anchor=True), 1, 1)  # the honest anchor still completes version 1
        assert coord.state.version == 1
        m.step()
        with pytest.raises(CoordinatorError, match="outside its partition"):  # rank 1 writing rank 0's entries
            lo0, hi0 = m.part("emb.weight", 0)
            p1(m.patch(1, **{"emb.weight": SparseDelta(torch.tensor([lo0]), m.t["emb.weight"][:1],
                                                         SHAPES["emb.weight"], torch.bfloat16)}), 2, 1)
        m.last.pop(1)  # the refused patch was not applied: resend rank 1's whole partition (always valid)
        p1(m.patch(1, anchor=True), 2, 1)
        p0(m.patch(0), 2, 0)
        r = rollout(coord.endpoint, "rollout")
        assert r.version == 2 and torch.equal(r.weights, m.flat())
        for c in (p0, p1, r):
            c.close()


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
        r = rollout(coord.endpoint, "rollout")
        assert r.version == 4 and torch.equal(r.weights, m.flat())
        for c in (p0, p1, r):
            c.close()


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
        r = rollout(coord.endpoint, "rollout")
        assert torch.equal(r.weights, m.flat())
        for c in (p1, r):
            c.close()
