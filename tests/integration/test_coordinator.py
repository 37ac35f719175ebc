"""The ZeroMQ coordinator with real sockets on loopback and real trainer processes."""
import json
import random
import time

import msgpack
import pytest
import torch
import zmq

from sparsecomm import SparseDelta
from sparsecomm.codec import encode
from sparsecomm.exchange import CoordinatorClient, CoordinatorError, RolloutClient
from sparsecomm.exchange.protocol import PROTOCOL_VERSION, REASONS, model_fingerprint, pack
from tests.integration.coordinator_helpers import running_coordinator, start_trainer, wait_all, weights_digest

pytestmark = pytest.mark.distributed


def results(tmp_path, names):
    return {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in names}


def flat_digest(res):
    return {r["digest"] for r in res.values()}


def test_three_trainers_stay_identical_and_match_the_coordinator(tmp_path):
    with running_coordinator(deadline_s=30, min_trainers=3) as c:
        names = ["t0", "t1", "t2"]
        wait_all([start_trainer(c.endpoint, n, tmp_path / f"{n}.json", steps=6) for n in names])
        res = results(tmp_path, names)
        assert len(flat_digest(res)) == 1
        assert all(r["version"] == c.state.version == 6 and r["hash"] == c.state.hash for r in res.values())
        assert sorted(r["joined"] for r in res.values()).count("seeded") == 1
        # the trainers' weights are the coordinator's canonical weights (same flat order)
        assert weights_digest(c) == res["t0"]["digest"]
        assert c.metrics.registry.get_sample_value("sparsecomm_coordinator_rounds_total") == 6
        m = res["t0"]["metrics"]
        assert m["comm/path"] == "allgather" and 0 < m["comm/sent_bytes"] < 4 * c.state.numel


def test_adaptive_density_through_the_coordinator(tmp_path):
    """Each trainer picks its own k; no collective agreement is attempted through the coordinator."""
    with running_coordinator(deadline_s=30, min_trainers=2) as c:
        wait_all([start_trainer(c.endpoint, n, tmp_path / f"{n}.json", steps=4, adaptive=True) for n in ("t0", "t1")])
        res = results(tmp_path, ["t0", "t1"])
        assert len(flat_digest(res)) == 1 and c.state.version == 4
        assert c.metrics.registry.get_sample_value("sparsecomm_coordinator_rejected_messages_total",
                                                   {"reason": "shape_mismatch"}) == 0


def test_killed_worker_stalls_nobody_and_rejoins(tmp_path):
    with running_coordinator(deadline_s=30, heartbeat_timeout_s=1.0, min_trainers=3) as c:
        dying = start_trainer(c.endpoint, "t2", tmp_path / "x.json", steps=8, die_after=2)
        others = [start_trainer(c.endpoint, n, tmp_path / f"{n}.json", steps=8) for n in ("t0", "t1")]
        dying.wait(60)
        assert dying.returncode == 9
        t0 = time.monotonic()
        wait_all(others)
        assert time.monotonic() - t0 < 30  # dropped after the heartbeat timeout, not waited for
        # t2 was dropped by the heartbeat timeout (not waited for as a deadline straggler), and every
        # round after its death averages exactly the two survivors
        assert c.metrics.registry.get_sample_value("sparsecomm_coordinator_stragglers_total") == 0
        contributors = {a.round: a.contributors for a in c.state.retained}
        assert contributors[0] == contributors[1] == ("t0", "t1", "t2")
        assert all(contributors[r] == ("t0", "t1") for r in range(2, 8)) and c.state.version == 8
        # the same worker comes back with fresh (version 0) weights and is brought up to date
        wait_all([start_trainer(c.endpoint, "t2", tmp_path / "t2.json", steps=0)])
        res = results(tmp_path, ["t0", "t1", "t2"])
        assert res["t2"]["joined"] in ("replayed", "snapshot")
        assert len(flat_digest(res)) == 1 and res["t2"]["hash"] == c.state.hash


def test_restart_from_checkpoint_while_workers_reconnect(tmp_path):
    ck, endpoint = tmp_path / "ck", "tcp://127.0.0.1:29811"
    cfg = dict(bind=endpoint, checkpoint_dir=str(ck), checkpoint_every=1, min_trainers=2, deadline_s=30)
    procs = []
    with running_coordinator(**cfg) as c:
        procs = [start_trainer(endpoint, n, tmp_path / f"{n}.json", steps=12, timeout_s=3) for n in ("t0", "t1")]
        deadline = time.monotonic() + 60
        while c.state.version < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    stopped_at = c.state.version  # read after its thread has stopped
    # the coordinator is gone mid-run (checkpoint written every round and on close); trainers wait, time out
    assert (ck / "coordinator.pt").exists() and stopped_at >= 4
    time.sleep(0.5)
    with running_coordinator(**cfg) as c2:
        assert c2.state.version == stopped_at  # restored
        wait_all(procs)  # they reconnect, rejoin (in sync, replay or snapshot) and finish
        res = results(tmp_path, ["t0", "t1"])
        assert len(flat_digest(res)) == 1
        assert all(r["hash"] == c2.state.hash for r in res.values())
        assert weights_digest(c2) == res["t0"]["digest"]


def raw_dealer(endpoint):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def reply(sock, timeout_ms=3000):
    assert sock.poll(timeout_ms), "no reply"
    return msgpack.unpackb(sock.recv_multipart()[0])


def test_bad_input_is_rejected_by_reason_and_counted(tmp_path):
    numel = 20
    fp = model_fingerprint([("w", (numel,), "float32")])
    with running_coordinator(max_frame_bytes=4096) as c:
        client = CoordinatorClient(c.endpoint, "good", timeout_s=5)
        w = torch.zeros(numel)
        assert client.join(fp, w, lambda d: None, lambda f: None) == "seeded"
        s = raw_dealer(c.endpoint)

        def rejected(reason):
            return c.metrics.registry.get_sample_value("sparsecomm_coordinator_rejected_messages_total", {"reason": reason})

        cases = [
            ([b"\xc1\xff garbage"], "malformed"),
            ([msgpack.packb({"v": 99, "op": "join"})], "protocol_version"),
            ([pack("dance", worker="x")], "unknown_op"),
            ([pack("push", worker="nobody", round=0, step=0, base_version=0), b"x"], "unknown_worker"),
            ([pack("join", worker="evil", role="trainer", fingerprint="other", numel=numel, version=0, hash="")], "fingerprint"),
            ([pack("join", worker="evil", role="admin", fingerprint=fp, numel=numel, version=0, hash="")], "bad_field"),
            ([pack("join", worker="evil", role="trainer", fingerprint=fp, numel=True, version=0, hash="")], "bad_field"),
            ([b"x" * 5000], "oversized"),
        ]
        for frames, reason in cases:
            s.send_multipart(frames)
            r = reply(s)
            assert r["op"] == "error" and r["reason"] == reason, (reason, r)
            assert rejected(reason) >= 1
        # a joined worker that lies: wrong shape, hostile payload, NaN, absurd values, duplicates, the future
        s.send_multipart([pack("join", worker="liar", role="trainer", fingerprint=fp, numel=numel, version=0, hash=c.state.hash)])
        assert reply(s)["op"] == "welcome"
        good = SparseDelta(torch.tensor([1, 5]), torch.tensor([0.1, -0.2]), (numel,))
        nan = encode(good, "raw", "fp32").replace(b"\xcd\xcc\xcc=", b"\x00\x00\xc0\x7f")  # 0.1 -> NaN, CRC now wrong
        lies = [
            (encode(SparseDelta(torch.tensor([1]), torch.tensor([1.0]), (numel + 1,)), "raw", "fp32"), "shape_mismatch"),
            (b"SPCD" + bytes(40), "bad_payload"),
            (nan, "bad_payload"),
            (encode(SparseDelta(torch.tensor([1]), torch.tensor([1e9]), (numel,)), "raw", "fp32"), "value_out_of_range"),
        ]
        for payload, reason in lies:
            s.send_multipart([pack("push", worker="liar", round=0, step=1, base_version=0), payload])
            assert reply(s)["reason"] == reason
        s.send_multipart([pack("push", worker="liar", round=5, step=1, base_version=0), encode(good)])
        assert reply(s)["reason"] == "bad_field"
        s.send_multipart([pack("push", worker="liar", round=0, step=1, base_version=0), encode(good)])
        s.send_multipart([pack("push", worker="liar", round=0, step=1, base_version=0, req=7), encode(good)])
        assert reply(s) == {"v": PROTOCOL_VERSION, "op": "ack", "round": 0, "status": "pending", "req": 7}  # a re-send: idempotent
        s.send_multipart([pack("push", worker="liar", round=0, step=1, base_version=0), encode(good.with_values(good.values * 2))])
        assert reply(s)["reason"] == "duplicate"  # a different delta for the same round is a conflict
        assert c.state.version == 0  # nothing corrupted the aggregate: the round still waits for "good"
        agg = client.push(encode(SparseDelta(torch.tensor([2]), torch.tensor([0.4]), (numel,))), 1)
        assert client.version == 1
        from sparsecomm.codec import decode

        d = decode(agg)  # mean of the liar's one valid push and good's
        assert d.indices.tolist() == [1, 2, 5] and torch.allclose(d.values, torch.tensor([0.05, 0.2, -0.1]))
        s.close()
        client.close()


def test_fuzzing_a_live_coordinator_does_not_change_honest_results(tmp_path):
    def run(fuzz: bool, out):
        out.mkdir()
        with running_coordinator(deadline_s=60, min_trainers=2) as c:
            procs = [start_trainer(c.endpoint, n, out / f"{n}.json", steps=6) for n in ("t0", "t1")]
            if fuzz:
                rng = random.Random(0)
                s = raw_dealer(c.endpoint)
                valid = pack("push", worker="t0", round=0, step=0, base_version=0)
                for i in range(300):  # bounded: 300 messages, then stop
                    kind = i % 3
                    if kind == 0:
                        frames = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))]
                    elif kind == 1:
                        frames = [valid[: rng.randint(0, len(valid))], b"SPCD"]
                    else:
                        frames = [pack(rng.choice(["push", "join", "sync", "snapshot", "init"]), worker=rng.choice(["t0", "zz"]),
                                       round=rng.randint(-2, 3)), bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))]
                    s.send_multipart(frames)
                    time.sleep(0.002)
                s.close()
            wait_all(procs)
            # refused with a reason, or (once the fuzzer spent its error budget) dropped unread as rate_limited
            rejected = sum(c.metrics.registry.get_sample_value("sparsecomm_coordinator_rejected_messages_total",
                                                               {"reason": r}) for r in REASONS)
            return results(out, ["t0", "t1"]), rejected, c.state.hash

    clean, _, h_clean = run(False, tmp_path / "clean")
    fuzzed, n_rejected, h_fuzzed = run(True, tmp_path / "fuzz")
    assert n_rejected >= 250
    assert h_clean == h_fuzzed  # the same aggregates, bit for bit
    assert flat_digest(clean) == flat_digest(fuzzed) and len(flat_digest(fuzzed)) == 1


def test_rollout_worker_holds_exact_bf16_weights(tmp_path):
    # the rollout client heartbeats only while it polls: a long heartbeat timeout keeps it joined while
    # the trainer process starts and trains (seconds on a loaded machine)
    with running_coordinator(deadline_s=30, anchor_every=3, heartbeat_timeout_s=120) as c:
        first = start_trainer(c.endpoint, "t0", tmp_path / "t0.json", steps=1)
        wait_all([first])
        numel, fp = c.state.numel, c.state.fingerprint
        r = RolloutClient(c.endpoint, "r0", fp, numel, timeout_s=10, heartbeat_s=0.2)
        r.connect()
        assert r.version == 1
        wait_all([start_trainer(c.endpoint, "t0", tmp_path / "t0.json", steps=5)])
        deadline = time.monotonic() + 10
        while r.version < c.state.version and time.monotonic() < deadline:
            r.poll(0.2)
        assert r.version == c.state.version == 6
        assert torch.equal(r.weights.view(torch.int16), c.state.weights.to(torch.bfloat16).view(torch.int16))
        assert r.conn.recv_bytes < 6 * 4 * numel  # far less than full copies
        r.close()


def test_curve_accepts_allowed_keys_and_rejects_others(tmp_path):
    from sparsecomm.cli import main

    certs, allowed = tmp_path / "certs", tmp_path / "allowed"
    assert main(["keys", str(certs), "server", "t0", "intruder"]) == 0
    allowed.mkdir()
    (allowed / "t0.key").write_bytes((certs / "t0.key").read_bytes())  # t0.key may act as worker "t0" only
    with running_coordinator(curve_secret_key=str(certs / "server.key_secret"), allow_keys=str(allowed)) as c:
        ok = start_trainer(c.endpoint, "t0", tmp_path / "t0.json", steps=2,
                           curve=(str(certs / "t0.key_secret"), str(certs / "server.key")))
        wait_all([ok])
        assert c.state.version == 2
        bad = CoordinatorClient(c.endpoint, "x", timeout_s=2, curve=(str(certs / "intruder.key_secret"), str(certs / "server.key")))
        with pytest.raises(TimeoutError):
            bad.join(c.state.fingerprint, torch.zeros(c.state.numel), lambda d: None, lambda f: None)
        bad.close()
        assert "x" not in c.peers


def test_quorum_closes_rounds_at_the_deadline_and_folds_late_deltas(tmp_path):
    numel = 10
    fp = model_fingerprint([("w", (numel,), "float32")])
    with running_coordinator(quorum=0.5, deadline_s=0.3, late="fold") as c:
        a = CoordinatorClient(c.endpoint, "a", timeout_s=5, heartbeat_s=0.1)
        b = CoordinatorClient(c.endpoint, "b", timeout_s=5, heartbeat_s=0.1)
        a.join(fp, torch.zeros(numel), lambda d: None, lambda f: None)
        b.join(fp, torch.zeros(numel), lambda d: None, lambda f: None)
        d = SparseDelta(torch.tensor([3]), torch.tensor([1.0]), (numel,))
        t0 = time.monotonic()
        a.push(encode(d), 1)  # b never pushes in round 0: closed at the deadline with a alone
        assert 0.25 < time.monotonic() - t0 < 3
        assert c.metrics.registry.get_sample_value("sparsecomm_coordinator_stragglers_total") == 1
        # b's late delta for round 0 is folded into round 1
        b.conn.send("push", encode(SparseDelta(torch.tensor([4]), torch.tensor([2.0]), (numel,))), round=0, step=1, base_version=0)
        time.sleep(0.2)
        assert c.metrics.registry.get_sample_value("sparsecomm_coordinator_late_deltas_total", {"action": "fold"}) == 1
        from sparsecomm.codec import decode

        agg = decode(a.push(encode(d), 2))  # round 1: a's delta and b's folded one, b missing again
        assert agg.indices.tolist() == [3, 4] and agg.values.tolist() == [0.5, 1.0]
        a.close()
        b.close()


def test_bad_config():
    from sparsecomm.exchange import CoordinatorConfig

    for kw in ({"quorum": 0}, {"late": "keep"}, {"deadline_s": 0}, {"curve_secret_key": "x"}, {"resparsify_density": 1.5}):
        with pytest.raises(ValueError):
            CoordinatorConfig(**kw)
