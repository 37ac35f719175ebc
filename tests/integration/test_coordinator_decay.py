"""Weight decay on the coordinator's replica: trainers decay their weights locally each step (ASPG,
decoupled), so the coordinator's canonical copy - what late joiners get as a snapshot or replay
and rollout workers as bf16 patches - must decay the same way, bit for bit.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/integration/test_coordinator_decay.py
"""
import json
import subprocess
import sys
import threading
import time

import pytest
import torch

from sparsecomm import SparseDelta
from sparsecomm.codec import encode
from sparsecomm.exchange import CoordinatorClient, CoordinatorError, RolloutClient
from sparsecomm.exchange.protocol import model_fingerprint
from tests.integration.coord_worker import model
from tests.integration.coordinator_helpers import ROOT, running_coordinator, wait_all

pytestmark = pytest.mark.distributed
WD, LR, STEPS = 0.5, 1e-2, 6  # a strong decay: every weight moves by ~lr*wd*|w| per step


def trainer(endpoint, worker, out):
    cmd = [sys.executable, "-m", "tests.integration.coord_worker", "--endpoint", endpoint, "--worker", worker,
           "--steps", str(STEPS), "--out", str(out), "--timeout-s", "30", "--weight-decay", str(WD)]
    return subprocess.Popen(cmd, cwd=str(ROOT), env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def flat_of(m) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def test_late_joiners_and_rollout_workers_get_the_trainers_decayed_weights(tmp_path):
    m0 = model()
    params = list(m0.parameters())
    fp = model_fingerprint((str(i), p.shape, p.dtype) for i, p in enumerate(params))
    numel = sum(p.numel() for p in params)
    n0 = sum(p.numel() for p in m0[0].parameters())
    with running_coordinator(min_trainers=2, heartbeat_timeout_s=60) as c:
        procs = [trainer(c.endpoint, n, tmp_path / f"{n}.json") for n in ("t0", "t1")]
        try:
            deadline = time.monotonic() + 120  # trainer processes start slowly on a loaded machine
            while c.state.weights is None:  # the rollout worker joins once a trainer has seeded the weights
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no trainer seeded"
                time.sleep(0.05)
            rollout = RolloutClient(c.endpoint, "r0", fp, numel, timeout_s=10, heartbeat_s=0.2)
            rollout.connect()
            assert rollout is not None
            while rollout.version < STEPS:
                rollout.poll(1.0)
            wait_all(procs)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        outs = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("t0", "t1")]
        trained = torch.load(str(tmp_path / "t0.json") + ".weights.pt")
        trained_flat = torch.cat([t.reshape(-1) for t in trained.values()])
        assert outs[0]["digest"] == outs[1]["digest"] and outs[0]["version"] == STEPS
        # the rounds carried the two groups' factors, and the chain commits to them
        assert c.state.retained[-1].decay == ((0, n0, 1 - LR * WD), (n0, numel, 1 - LR * WD / 2))
        assert c.state.hash == outs[0]["hash"]
        # the coordinator's canonical copy decayed with the trainers: bit for bit
        assert torch.equal(c.state.weights, trained_flat)
        # a late joiner by snapshot (it holds nothing the coordinator knows)
        got = {}
        late = CoordinatorClient(c.endpoint, "late-snapshot", timeout_s=10, heartbeat_s=0.2)
        how = late.join(fp, torch.zeros(numel), lambda d: None, lambda w: got.setdefault("w", w.clone()))
        assert how == "snapshot" and torch.equal(got["w"], trained_flat)
        late.close()
        # a late joiner by replay (it holds W0): every aggregate's decay, then its payload
        w = flat_of(m0).clone()

        def decay(ops):
            for a, b, f in ops:
                w[a:b].mul_(f)

        late = CoordinatorClient(c.endpoint, "late-replay", timeout_s=10, heartbeat_s=0.2)
        how = late.join(fp, w.clone(), lambda d: d.add_to(w), lambda f: w.copy_(f), decay)
        assert how == "replayed" and late.version == STEPS and torch.equal(w, trained_flat)
        late.close()
        # the rollout copy is bf16(trainers' weights), bit for bit
        assert torch.equal(rollout.weights.view(torch.int16), trained_flat.to(torch.bfloat16).view(torch.int16))
        rollout.close()
        # without the decay the coordinator would hold other weights (the test can fail)
        assert not torch.equal(trained_flat, flat_of(m0))


def test_trainers_that_decay_differently_are_refused(tmp_path):
    numel = 64
    fp = model_fingerprint([("w", (numel,), "float32")])
    payload = encode(SparseDelta(torch.tensor([1]), torch.tensor([0.5]), (numel,)), "raw", "fp32")
    with running_coordinator(min_trainers=2) as c:
        a = CoordinatorClient(c.endpoint, "a", timeout_s=10, heartbeat_s=0.1)
        b = CoordinatorClient(c.endpoint, "b", timeout_s=10, heartbeat_s=0.1)
        wa, wb = torch.zeros(numel), torch.zeros(numel)
        a.join(fp, wa, lambda d: None, lambda f: None)
        b.join(fp, wb, lambda d: None, lambda f: None)
        box = {}
        th = threading.Thread(target=lambda: box.setdefault("agg", a.push(payload, 1, decay=((0, numel, 0.99),))))
        th.start()
        while "a" not in c.rounds.pending:
            threading.Event().wait(0.01)
        with pytest.raises(CoordinatorError) as e:
            b.push(payload, 1, decay=((0, numel, 0.98),))
        assert e.value.reason == "decay_mismatch"
        for bad in (((0, numel, 1.5),), ((0, numel + 1, 0.9),), ((5, 5, 0.9),)):  # validated like every field
            with pytest.raises(CoordinatorError) as e:
                b.push(payload, 1, decay=bad)
            assert e.value.reason == "bad_field"
        b.push(payload, 1, decay=((0, numel, 0.99),))  # agreeing: the round closes
        th.join(10)
        assert "agg" in box and c.state.retained[-1].decay == ((0, numel, 0.99),)
        assert c.metrics.registry.get_sample_value("sparsecomm_coordinator_rejected_messages_total",
                                                   {"reason": "decay_mismatch"}) == 1
        a.close()
        b.close()
