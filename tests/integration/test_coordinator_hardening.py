"""The coordinator against a hostile or failing world: msgpack bombs, junk floods while a worker
dies, stolen identities, unsafe binds, re-sent pushes and kill -9. Loopback only; every process
and thread started here is stopped here.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/integration/test_coordinator_hardening.py
"""
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import msgpack
import pytest
import torch

from sparsecomm import SparseDelta
from sparsecomm.codec import decode, encode
from sparsecomm.exchange import CoordinatorClient, CoordinatorConfig, CoordinatorError
from sparsecomm.exchange.coordinator import is_loopback
from sparsecomm.exchange.protocol import model_fingerprint
from tests.integration.coordinator_helpers import (coordinator_process, free_port, running_coordinator, start_trainer,
                                                   wait_all)

pytestmark = pytest.mark.distributed
NUMEL = 64
FP = model_fingerprint([("w", (NUMEL,), "float32")])


def noop(_):
    pass


def joined(endpoint, worker, **kw):
    c = CoordinatorClient(endpoint, worker, timeout_s=kw.pop("timeout_s", 10), heartbeat_s=kw.pop("heartbeat_s", 0.1), **kw)
    c.join(FP, torch.zeros(NUMEL), noop, noop)
    return c


def delta(i, v):
    return encode(SparseDelta(torch.tensor([i]), torch.tensor([v]), (NUMEL,)), "raw", "fp32")


def peak_rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def msgpack_bomb(size_bytes: int) -> bytes:
    """~size_bytes of msgpack that unpacks into ~70x as much: arrays of 255 empty maps (1 byte each,
    a 64-byte dict each in Python), within the per-container limits the old decoders used."""
    inner = b"\xdc" + struct.pack(">H", 255) + b"\x80" * 255
    n = size_bytes // len(inner)
    return b"\x81\xa1t" + b"\xdd" + struct.pack(">I", n) + inner * n


def test_msgpack_bombs_cost_at_most_a_small_multiple_of_their_size(tmp_path):
    """16 MiB bombs as the protocol header and as the codec header of a push: refused from their
    length prefix, before msgpack materialises anything; the coordinator's peak RSS grows by a
    small multiple of the message size (it was ~89x: 1.4 GiB for one 16 MiB message)."""
    port = free_port()
    bomb = msgpack_bomb(16 << 20)
    payload = struct.pack("<4sII", b"SPCD", len(bomb), zlib.crc32(bomb)) + bomb  # a valid codec prefix and CRC
    with coordinator_process(port, tmp_path / "coord.log", "--max-frame-bytes", 64 << 20) as p:
        client = joined(f"tcp://127.0.0.1:{port}", "t0")
        time.sleep(0.5)
        open(f"/proc/{p.pid}/clear_refs", "w").write("5")  # reset the peak-RSS mark to the current RSS
        base = rss_bytes(p.pid)
        client.conn.send("push", payload, round=0, step=0, base_version=0)
        with pytest.raises(CoordinatorError) as e:
            client.conn.recv()
        assert e.value.reason == "bad_payload" and "header length" in e.value.detail
        s = client.conn.sock  # the same connection, a bomb as the protocol header itself
        s.send_multipart([bomb, b""])
        assert s.poll(10_000)
        assert msgpack.unpackb(s.recv_multipart()[0])["reason"] == "oversized"
        growth = peak_rss_bytes(p.pid) - base
        assert growth < 4 * len(payload), f"peak RSS grew by {growth / 2**20:.0f} MiB for a {len(payload) >> 20} MiB message"
        # still serving: an honest push closes the round
        assert decode(client.push(delta(3, 1.0), 1)).indices.tolist() == [3]
        client.close()


FLOOD = r"""
import os, random, sys, time, zmq
ctx = zmq.Context()
socks = []
for _ in range(8):  # several connections: a per-connection budget alone does not stop it
    s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0); s.setsockopt(zmq.SNDHWM, 100000); s.connect(sys.argv[1]); socks.append(s)
junk = [b"\xc1\xff", b"\x82\xa1v\x01\xa2op\xa9heartbeat", os.urandom(200)]
t_end = time.monotonic() + float(sys.argv[2])
i = 0
while time.monotonic() < t_end:
    try:
        socks[i % 8].send_multipart([junk[i % 3], b"x"], zmq.NOBLOCK)
    except zmq.Again:
        pass
    i += 1
"""


def test_a_junk_flood_does_not_stop_a_dead_trainer_being_dropped(tmp_path):
    """Trainer b dies (no leave) while junk floods the socket: a's round still closes once b's
    heartbeat times out, not when the flood ends (before: the message drain never yielded to the timer)."""
    flood_s = 25.0
    with running_coordinator(heartbeat_timeout_s=2.0, deadline_s=600, min_trainers=2) as c:
        a, b = joined(c.endpoint, "a", timeout_s=30), joined(c.endpoint, "b")
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, c.endpoint, str(flood_s)])
        try:
            time.sleep(0.7)  # the flood is on (and a, silent meanwhile, is well within its heartbeat timeout)
            b.conn.close(leave=False)  # killed: never pushes, never says goodbye
            t0 = time.monotonic()
            agg = decode(a.push(delta(5, 2.0), 1))
            waited = time.monotonic() - t0
            assert flood.poll() is None, "the flood ended before the round closed: the test proves nothing"
        finally:
            flood.kill()
            flood.wait(10)
        assert agg.indices.tolist() == [5] and agg.values.tolist() == [2.0] and c.state.version == 1
        assert waited < 10, f"round took {waited:.1f} s under the flood (heartbeat timeout 2 s, flood {flood_s} s)"
        reg = c.metrics.registry
        from sparsecomm.exchange.protocol import REASONS

        refused = sum(reg.get_sample_value("sparsecomm_coordinator_rejected_messages_total", {"reason": r}) for r in REASONS)
        assert refused > 1000 and reg.get_sample_value("sparsecomm_coordinator_rejected_messages_total",
                                                       {"reason": "rate_limited"}) > 0
        a.close()


def test_a_curve_key_only_speaks_for_its_own_worker(tmp_path):
    from sparsecomm.cli import main

    certs, allowed = tmp_path / "certs", tmp_path / "allowed"
    assert main(["keys", str(certs), "server", "t1", "t2"]) == 0
    allowed.mkdir()
    for n in ("t1", "t2"):
        (allowed / f"{n}.key").write_bytes((certs / f"{n}.key").read_bytes())
    with running_coordinator(curve_secret_key=str(certs / "server.key_secret"), allow_keys=str(allowed)) as c:
        server = str(certs / "server.key")
        thief = CoordinatorClient(c.endpoint, "t1", timeout_s=5, curve=(str(certs / "t2.key_secret"), server))
        with pytest.raises(CoordinatorError) as e:
            thief.join(FP, torch.zeros(NUMEL), noop, noop)
        assert e.value.reason == "forbidden" and "t1" not in c.peers
        thief.close()
        t1 = joined(c.endpoint, "t1", curve=(str(certs / "t1.key_secret"), server))
        t2 = joined(c.endpoint, "t2", curve=(str(certs / "t2.key_secret"), server))
        assert set(c.peers) == {"t1", "t2"}
        # t2's connection cannot push as t1 either, even after t1 joined
        t2.conn.worker = "t1"
        t2.conn.send("push", delta(1, 1.0), round=0, step=0, base_version=0)
        with pytest.raises(CoordinatorError) as e:
            t2.conn.recv()
        assert e.value.reason == "forbidden" and not c.rounds.pending
        t2.conn.worker = "t2"
        t1.close()
        t2.close()


def test_a_non_loopback_bind_needs_curve_or_insecure(tmp_path, capsys):
    for ep in ("tcp://127.0.0.1:5555", "tcp://127.3.0.1:1", "tcp://localhost:1", "tcp://[::1]:1", "ipc:///tmp/x", "inproc://x"):
        assert is_loopback(ep), ep
    for ep in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.0.0.1:5555", "tcp://eth0:5555", "tcp://host.example:1"):
        assert not is_loopback(ep), ep
        with pytest.raises(ValueError, match="without CURVE"):
            CoordinatorConfig(bind=ep)
        CoordinatorConfig(bind=ep, insecure=True)  # an explicit choice; nothing is bound here
        CoordinatorConfig(bind=ep, curve_secret_key="s.key_secret", allow_keys="allowed")
    from sparsecomm.cli import main

    assert main(["coordinator", "--bind", "tcp://0.0.0.0:5555", "--max-seconds", "0"]) == 2
    assert "--insecure" in capsys.readouterr().out


def test_a_resent_push_is_answered_idempotently(tmp_path):
    with running_coordinator(min_trainers=2, deadline_s=600) as c:
        a, b = joined(c.endpoint, "a"), joined(c.endpoint, "b")
        a.conn.send("push", delta(1, 1.0), round=0, step=1, base_version=0)
        a.conn.send("push", delta(1, 1.0), round=0, step=1, base_version=0)  # our reply seemed lost: re-send
        h, _ = a.conn.recv()
        assert h["op"] == "ack" and h["round"] == 0 and h["req"] == a.conn.req
        first = bytes(b.push(delta(2, 3.0), 1))
        # a's aggregate arrives; a (not having seen it, say) re-sends the push once more after the round closed
        a.conn.send("push", delta(1, 1.0), round=0, step=1, base_version=0)
        replies = []
        while a.conn.sock.poll(500):
            replies.append(a.conn.recv())
        assert [h["op"] for h, _ in replies] == ["aggregate", "aggregate"]
        assert all(bytes(f[0]) == first and h["version"] == 1 and h["contributors"] == ["a", "b"] for h, f in replies)
        assert c.state.version == 1  # counted once: the mean of a and b, not of a, a and b
        a._verify(*replies[0])  # the client applies it once (the second copy is a stale duplicate)
        d = decode(first)
        assert d.indices.tolist() == [1, 2] and d.values.tolist() == [0.5, 1.5]
        # the client path: a push whose aggregate it has not read yet is re-sent after a timeout
        a.conn.recv = _drop_first(a.conn.recv)  # the reply to the first send is "lost"
        rounds_before = c.metrics.registry.get_sample_value("sparsecomm_coordinator_rounds_total")
        b.conn.send("push", delta(4, 1.0), round=1, step=2, base_version=1)
        got = decode(a.push(delta(3, 1.0), 2, get_flat=lambda: torch.zeros(NUMEL)))
        assert got.indices.tolist() == [3, 4] and a.version == 2 == c.state.version
        assert c.metrics.registry.get_sample_value("sparsecomm_coordinator_rounds_total") == rounds_before + 1
        a.close()
        b.close()


def _drop_first(recv):
    """Wrap conn.recv so that the first message it would return is discarded (a lost reply)."""
    state = {"dropped": False}

    def wrapped(timeout_s=None):
        if not state["dropped"]:
            recv(timeout_s)
            state["dropped"] = True
            raise TimeoutError("reply lost (test)")
        return recv(timeout_s)

    return wrapped


def _train(tmp_path, tag, kill_at_version=None):
    """Two trainers through a coordinator process with a journal; optionally kill -9 the
    coordinator once it reached `kill_at_version` and start it again on the same directory."""
    out, port = tmp_path / tag, free_port()
    out.mkdir()
    args = ["--checkpoint-dir", out / "ck", "--checkpoint-every", 1000, "--min-trainers", 2, "--deadline-s", 600,
            "--heartbeat-timeout-s", 30]
    endpoint = f"tcp://127.0.0.1:{port}"
    with coordinator_process(port, out / "coord.log", *args) as p:
        procs = [start_trainer(endpoint, n, out / f"{n}.json", steps=10, timeout_s=8) for n in ("t0", "t1")]
        if kill_at_version is None:
            wait_all(procs)
            return out, None
        deadline = time.monotonic() + 120
        while _journal_version(out / "ck") < kill_at_version and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    killed_at = _journal_version(out / "ck")
    with coordinator_process(port, out / "coord.log", *args):
        wait_all(procs)
    assert "replayed" in (out / "coord.log").read_text()
    return out, killed_at


def _journal_version(ck_dir) -> int:
    from sparsecomm.exchange.coordinator.checkpoint import read_journal

    return max((r["aggregate"].version for r in read_journal(ck_dir)), default=0)


def test_kill_9_of_the_coordinator_loses_no_delta(tmp_path):
    """The same two-trainer run with and without a kill -9 of the coordinator mid-run ends with
    the same hash chain and the same weights, bit for bit: no round lost, none applied twice."""
    ref, _ = _train(tmp_path, "ref")
    crash, killed_at = _train(tmp_path, "crash", kill_at_version=4)
    assert 4 <= killed_at < 10
    r = {n: json.loads((ref / f"{n}.json").read_text()) for n in ("t0", "t1")}
    k = {n: json.loads((crash / f"{n}.json").read_text()) for n in ("t0", "t1")}
    assert r["t0"]["version"] == k["t0"]["version"] == 10
    assert {x["hash"] for x in r.values()} == {x["hash"] for x in k.values()} and len({x["hash"] for x in k.values()}) == 1
    assert {x["digest"] for x in r.values()} == {x["digest"] for x in k.values()}
