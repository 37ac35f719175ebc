"""Exact resume through the coordinator: "train N, save, train M" equals "train N, save, load into
fresh objects (model, ASPG, CoordinatorTransport), train M", bit for bit, weights and hash chain.

The transport's own state is only its push counter (`state_dict`); version, hash and round are
re-derived from the coordinator when the fresh transport joins, which this test exercises.

A trainer killed after pushing past its checkpoint resumes with a residual that still holds the
pushed deltas; its outbox (exchange/outbox.py) and the coordinator's answer at join decide which
leave the residual. The ledger checked: (W - W_checkpoint) + residual == residual_checkpoint,
i.e. every delta is either in the weights or in the residual, exactly once.
"""
import io

import pytest
import torch
import torch.nn as nn

from sparsecomm.exchange import CoordinatorTransport
from sparsecomm.optim import ASPG
from tests.integration.coordinator_helpers import running_coordinator

pytestmark = pytest.mark.distributed
N, M = 3, 3


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def build(endpoint, m, outbox=None):
    tr = CoordinatorTransport(endpoint, "t0", timeout_s=20, heartbeat_s=0.2, outbox=outbox)
    return tr, ASPG(m.parameters(), lr=1e-2, density=0.1, value_codec="fp32", transport=tr)


def steps(m, opt, start, count):
    for step in range(start, start + count):
        g = torch.Generator().manual_seed(step)  # the data of step `step`, whoever runs it
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()


def snapshot(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_resume_through_the_coordinator_is_bit_exact():
    with running_coordinator() as c:
        m = model()
        tr, opt = build(c.endpoint, m)
        steps(m, opt, 0, N + M)
        straight = [p.detach().clone() for p in m.parameters()]
        straight_hash, straight_step = c.state.hash, tr.state_dict()["step"]
        tr.close()
    with running_coordinator() as c:
        m = model()
        tr, opt = build(c.endpoint, m)
        steps(m, opt, 0, N)
        saved = snapshot({"model": m.state_dict(), "opt": opt.state_dict(), "transport": tr.state_dict()})
        tr.close()  # the trainer process ends; the coordinator lives on
        ck = torch.load(io.BytesIO(saved), weights_only=False)
        m2 = model()
        m2.load_state_dict(ck["model"])
        tr2, opt2 = build(c.endpoint, m2)  # joins: the coordinator is at version N, we hold version N's weights
        opt2.load_state_dict(ck["opt"])
        tr2.load_state_dict(ck["transport"])
        steps(m2, opt2, N, M)
        assert tr2.client.version == N + M and c.state.hash == straight_hash
        assert tr2.state_dict()["step"] == straight_step
        for a, b in zip(straight, m2.parameters()):
            assert torch.equal(a, b.detach())
        tr2.close()


def flat(m) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def crash_after_checkpoint(c, outbox, after: int):
    """Train N steps, checkpoint, push `after` more deltas, die (no leave); return the checkpoint."""
    m = model()
    tr, opt = build(c.endpoint, m, outbox)
    steps(m, opt, 0, N)
    ck = torch.load(io.BytesIO(snapshot({"model": m.state_dict(), "opt": opt.state_dict(),
                                         "transport": tr.state_dict()})), weights_only=False)
    steps(m, opt, N, after)
    tr.client.conn.close(leave=False)  # kill -9: the pushes are counted, the process and its residual gone
    return ck


def resume(endpoint, ck, outbox):
    m = model()
    m.load_state_dict(ck["model"])
    tr, opt = build(endpoint, m, outbox)
    opt.load_state_dict(ck["opt"])
    tr.load_state_dict(ck["transport"])
    return m, tr, opt


def ledger_after_one_exchange(m, opt, ck_weights):
    """(W - W_checkpoint) + residual after one step that adds no update (lr 0): only the resume's
    subtraction and the exchange move deltas between residual and weights."""
    for g in opt.param_groups:
        g["lr"] = 0.0
    steps(m, opt, 100, 1)
    return flat(m) - ck_weights + opt.ef.residuals["flat"]


def test_a_restart_never_sends_a_counted_delta_twice(tmp_path):
    with running_coordinator() as c:
        ck = crash_after_checkpoint(c, tmp_path / "t0.outbox", after=2)
        ck_weights = torch.cat([v.reshape(-1) for v in ck["model"].values()])
        ck_residual = ck["opt"]["aspg"]["residual"]
        m, tr, opt = resume(c.endpoint, ck, tmp_path / "t0.outbox")
        # the coordinator counted both pushes after the checkpoint (rounds N and N+1)
        assert tr.resume_report == {"after_step": N, "counted_rounds": [N, N + 1], "assumed_counted_rounds": [],
                                    "not_counted_rounds": []}
        assert tr.client.version == N + 2 and torch.equal(flat(m), c.state.weights)  # rejoined at the coordinator's
        led = ledger_after_one_exchange(m, opt, ck_weights)
        torch.testing.assert_close(led, ck_residual, rtol=0, atol=1e-6)
        # what a restart without the outbox would have sent again: the ledger would be off by it
        pushed = sum(torch.zeros_like(ck_residual).index_add_(0, *decode_pair(a.payload)) for a in list(c.state.retained)[N:N + 2])
        assert float(pushed.abs().max()) > 1e-3
        tr.close()


def test_pushes_the_coordinator_lost_stay_in_the_residual(tmp_path):
    with running_coordinator() as c:
        ck = crash_after_checkpoint(c, tmp_path / "t0.outbox", after=2)
    with running_coordinator() as c:  # a coordinator without durable state: it never saw those rounds
        m, tr, opt = resume(c.endpoint, ck, tmp_path / "t0.outbox")
        assert tr.how_joined == "seeded" and tr.resume_report["not_counted_rounds"] == [N, N + 1]
        assert tr.resume_report["counted_rounds"] == [] and tr.take_delivered() == []
        ck_weights = torch.cat([v.reshape(-1) for v in ck["model"].values()])
        led = ledger_after_one_exchange(m, opt, ck_weights)
        torch.testing.assert_close(led, ck["opt"]["aspg"]["residual"], rtol=0, atol=1e-6)
        tr.close()


def test_a_fresh_run_starts_a_new_outbox(tmp_path):
    with running_coordinator() as c:
        crash_after_checkpoint(c, tmp_path / "t0.outbox", after=1)
    with running_coordinator() as c:
        m = model()
        tr, opt = build(c.endpoint, m, tmp_path / "t0.outbox")  # no load_state_dict: not a resume
        steps(m, opt, 0, 1)
        recs = tr.outbox.records()
        assert [(r["base"], r["step"], r["round"]) for r in recs] == [(-1, 1, 0)]
        tr.close()


def decode_pair(payload):
    from sparsecomm.codec import decode

    d = decode(payload)
    return d.indices, d.values.float()
