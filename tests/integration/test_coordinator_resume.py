"""Exact resume through the coordinator: "train N, save, train M" equals "train N, save, load into
fresh objects (model, ASPG, CoordinatorTransport), train M", bit for bit, weights and hash chain.

The transport's own state is only its push counter (`state_dict`); version, hash and round are
re-derived from the coordinator when the fresh transport joins, which this test exercises.
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


def build(endpoint, m):
    tr = CoordinatorTransport(endpoint, "t0", timeout_s=20, heartbeat_s=0.2)
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
