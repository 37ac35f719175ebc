"""Federated RL over sparse deltas (sparsecomm.federated): the client/server parts in one process,
and one real Flower simulation (Ray, 3 supernodes) carrying the same payloads in Flower messages.

Tolerances: at density 1.0 the sparse pipeline averages model *changes* while dense FedAvg averages
*models*, so they agree to fp32 rounding, not bit for bit: |diff| <= 1e-6 after one SGD round;
<= 1e-5 after 2 Adam rounds (Adam's normalisation amplifies start-point rounding a little); the Flower run and the in-process run of the same
rounds and faults agree bit for bit (torch.equal).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from sparsecomm.codec import decode_model, encode_model  # noqa: E402
from sparsecomm.compress import make_selector  # noqa: E402
from sparsecomm.delta import SparseDelta  # noqa: E402
from sparsecomm.federated import FedConfig, FedRun, FedServer  # noqa: E402
from sparsecomm.federated.client import LocalTrainer, Uplink, _seed, load_state, model_state, to_wire  # noqa: E402
from sparsecomm.federated.split import leading_digit, split_clients  # noqa: E402
from sparsecomm.rl.models import build_model, char_tokenizer  # noqa: E402

SMALL = dict(clients=3, local_steps=1, prompts_per_step=2, prompts_per_client=20, eval_size=8,
             grpo={"group_size": 4, "max_new_tokens": 3, "beta": 0.0})


@pytest.fixture(scope="module")
def base():
    model, _ = build_model("tiny", char_tokenizer(), seed=0)
    return model_state(model)


def test_config_refuses_bad_values_with_a_reason():
    for bad, words in [(dict(aggregator="fedprox"), "mu > 0"), (dict(mu=0.1), "aggregator=fedprox"),
                       (dict(quorum=9, clients=8), "quorum"), (dict(density_up=0.0), "density"),
                       (dict(split="dirichlet"), "split")]:
        with pytest.raises(ValueError, match=words):
            FedConfig(**bad)


def test_noniid_split_is_seed_fixed_and_disjoint():
    a, b = split_clients(8, ("addition", "sort"), "noniid", 3), split_clients(8, ("addition", "sort"), "noniid", 3)
    assert a == b
    assert {d.tasks for d in a} == {("addition",), ("sort",)}
    for task in ("addition", "sort"):  # the clients of one task cover the digits 0-9 once
        assert "".join(sorted("".join(d.digits for d in a if d.tasks == (task,)))) == "0123456789"
    d = a[0]
    assert all(leading_digit(e.prompt) in d.digits for e in d.examples(d.tasks[0], {}, 30, 0))


def test_error_feedback_keeps_what_was_not_sent():
    up = Uplink(density=0.1)
    u1, u2 = torch.randn(50), torch.randn(50)
    sent1 = decode_model(up.encode({"w": u1}, 1, 0))["w"]
    assert sent1.k == 5
    assert torch.equal(up.ef.residual("w") + sent1.to_dense(), u1)  # exact conservation
    sent2 = decode_model(up.encode({"w": u2}, 2, 1))["w"]
    total = sent1.to_dense() + sent2.to_dense() + up.ef.residual("w")
    torch.testing.assert_close(total, u1 + u2, rtol=0, atol=1e-6)
    # what round 1 left behind competes in round 2: an entry of u1 just below the cut can now be sent
    assert set(sent2.indices.tolist()) != set(make_selector("topk").select(u2, 5).indices.tolist())


def test_one_local_sgd_step_at_density_one_equals_data_parallel_sgd(base):
    """FedAvg, density 1.0, one local SGD step = one synchronous data-parallel SGD step on the same batches."""
    cfg = FedConfig(**{**SMALL, "local_optimizer": "sgd", "local_lr": 0.5, "density_up": 1.0, "density_down": 1.0,
                       "split": "iid"}, rounds=1)
    run = FedRun(cfg, base)
    rep = run.round(1)
    assert rep.applied and rep.accepted == [0, 1, 2]
    # the reference: average the gradients of the same three batches, one SGD step
    grads = []
    for c in run.clients:
        t = LocalTrainer(cfg, c.trainer.data)
        load_state(t.model, base)
        loss, _ = t.loss(_seed(cfg.seed, c.trainer.data.client, 1, 0))  # the batch client c drew in round 1
        t.model.zero_grad()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in t.model.named_parameters()})
    ref = {n: base[n] - 0.5 * sum(g[n] for g in grads) / 3 for n in base}
    got = run.global_state()
    for n in base:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-6)
    assert max(float((got[n] - base[n]).abs().max()) for n in base) > 1e-3  # it moved


def test_sparse_at_density_one_equals_dense_fedavg_and_saves_bytes_below(base):
    kw = {**SMALL, "split": "noniid", "rounds": 2}
    sparse = FedRun(FedConfig(**kw, density_up=1.0, density_down=1.0), base)
    dense = FedRun(FedConfig(**kw), base, dense=True)
    for r in (1, 2):
        sparse.round(r)
        dense.round(r)
    a, b = sparse.global_state(), dense.global_state()
    for n in base:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-5)
    one = FedRun(FedConfig(**kw, density_up=0.01, density_down=0.01, value_codec_up="bf16", value_codec_down="bf16"), base)
    rep = one.round(1)
    assert rep.dense_bytes_per_client * 3 / rep.bytes_up > 100  # 1% bf16, one flat tensor: > 100x fewer bytes up


def test_malformed_or_foreign_uploads_are_refused_with_a_reason(base):
    cfg = FedConfig(**SMALL, density_up=0.01)
    wire = to_wire(base, cfg.layout)
    server = FedServer(cfg, wire)
    good = Uplink(0.01).encode({"model": torch.randn_like(wire["model"]) * 1e-3}, 1, 0)
    assert server.accept(0, good, 1, 2.0)[0] is not None
    n = wire["model"].numel()
    dense = SparseDelta(torch.arange(n), torch.ones(n), (n,))
    cases = {
        "truncated": (good[:-3], "malformed payload"),
        "flipped bit": (good[:40] + bytes([good[40] ^ 1]) + good[41:], "malformed payload"),
        "not ours": (b"hello", "malformed payload"),
        "wrong names": (encode_model({"other": dense}), "names differ"),
        "wrong shape": (encode_model({"model": SparseDelta.empty((n - 1,))}, step=1), "shape"),
        "wrong dtype": (encode_model({"model": SparseDelta.empty((n,), torch.float16)}, step=1), "dtype"),
        "stale base": (encode_model({"model": SparseDelta.empty((n,))}, step=1, base_version=5), "stale"),
        "wrong round": (encode_model({"model": SparseDelta.empty((n,))}, step=7), "round"),
        "over budget": (encode_model({"model": dense}, step=1), "exceed the uplink budget"),
    }
    for what, (payload, words) in cases.items():
        up, reason = server.accept(0, payload, 1, 2.0)
        assert up is None and words in reason, (what, reason)
    assert server.accept(0, good, 1, float("nan"))[0] is None


def test_quorum_and_partial_participation(base):
    cfg = FedConfig(**{**SMALL, "clients": 4}, fraction=0.5, quorum=2, rounds=2)
    run = FedRun(cfg, base)
    rep = run.round(1)
    assert len(rep.accepted) == 2 and rep.applied
    asked = rep.accepted
    rep2 = run.round(2, drop={c for c in range(4)})  # nobody answers: below quorum, the round is skipped
    assert not rep2.applied and run.server.version == 1 and asked


def _upload(server, client, values: torch.Tensor, rnd: int):
    n = values.numel()
    payload = encode_model({"model": SparseDelta(torch.arange(n), values, (n,))}, step=rnd, base_version=server.version)
    up, reason = server.accept(client, payload, rnd, 1.0)
    assert up is not None, reason
    return up


def test_fedadam_step_follows_reddi_et_al_and_downlink_conserves_the_step():
    """FedAdam: m = (1-b1) d, v = (1-b2) d^2, x += eta m / (sqrt v + tau) on the first round. Top-k downlink:
    broadcast + server residual == master after every round (what was not broadcast is kept, not lost)."""
    cfg = FedConfig(clients=2, aggregator="fedadam", server_lr=0.1, fedadam_betas=(0.9, 0.99), fedadam_tau=1e-3,
                    density_up=1.0, density_down=0.25)
    x0 = torch.zeros(8)
    server = FedServer(cfg, {"model": x0.clone()})
    d0, d1 = torch.linspace(-1, 1, 8), torch.linspace(1, 3, 8)
    assert server.finish_round(1, [_upload(server, 0, d0, 1), _upload(server, 1, d1, 1)])
    mean = (d0 + d1) / 2
    expect = 0.1 * (0.1 * mean) / ((0.01 * mean * mean).sqrt() + 1e-3)
    torch.testing.assert_close(server.master["model"], expect, rtol=1e-6, atol=1e-7)
    for rnd in (1, 2):
        if rnd == 2:
            assert server.finish_round(2, [_upload(server, 0, d1, 2)])
        kept = server.down_ef.residual("model")
        torch.testing.assert_close(server.broadcast["model"] + kept, server.master["model"], rtol=0, atol=1e-6)
        assert int((server.broadcast["model"] != 0).sum()) <= 2 * rnd  # 25% of 8 entries per round
    assert len(server.downlink_for(0)) == 2 and len(server.downlink_for(2)) == 0


def test_fedadam_and_fedprox_train(base):
    for kw in (dict(aggregator="fedadam", server_lr=1e-2), dict(aggregator="fedprox", mu=0.1)):
        run = FedRun(FedConfig(**SMALL, **kw, rounds=1), base)
        assert run.round(1).applied
        assert any(not torch.equal(run.global_state()[n], base[n]) for n in base)


def test_encoded_delta_survives_flower_record_serialization_bit_exactly():
    """What the strategy and the Mod put in a Flower message (a ConfigRecord of bytes) comes back unchanged."""
    flwr_app = pytest.importorskip("flwr.app")
    up = Uplink(0.05, value_codec="bf16")
    payload = up.encode({"model": torch.randn(4000), "b": torch.randn(7, 3)}, 4, 3)
    rec = flwr_app.ConfigRecord({"payload": payload, "version": 3, "partition": 1})
    back = flwr_app.ConfigRecord.inflate(rec.deflate())
    assert back["payload"] == payload
    a, b = decode_model(payload), decode_model(back["payload"])
    for n in a:
        assert torch.equal(a[n].indices, b[n].indices) and torch.equal(a[n].values, b[n].values) and b[n].step == 4


@pytest.mark.distributed
@pytest.mark.slow
def test_flower_simulation_matches_in_process_rounds_with_a_straggler_and_a_dropout(base):
    """Real Flower: 3 supernodes (Ray), 3 rounds. Round 2: partition 2 raises (a dropout); round 3: partition 1
    sleeps past the deadline (a straggler). Neither stalls its round (the straggler's round closes at the
    deadline), and the final model equals the in-process run of the same rounds bit for bit. (The straggler is
    in the last round on purpose: a straggler's node state is written back whenever it finishes, racing its
    next round; see flower.py.)"""
    flower = pytest.importorskip("sparsecomm.federated.flower")
    deadline = 30.0  # a normal client must finish a round inside it on a loaded 2-core machine
    cfg = FedConfig(**SMALL, rounds=3, deadline_s=deadline, density_up=0.05, density_down=0.05)
    out = flower.run_simulation(cfg, base, flower.Faults(sleep_s={1: {3: deadline + 3}}, fail={2: {2}}), num_cpus=3)
    strat = out["strategy"]
    r1, r2, r3 = strat.reports
    assert sorted(r1.accepted) == [0, 1, 2], r1
    assert sorted(r2.accepted) == [0, 1] and any("injected dropout" in v for v in r2.refused.values()) and r2.applied, r2
    assert sorted(r3.accepted) == [0, 2] and len(r3.missing) == 1 and r3.applied, r3
    assert strat.round_s[3] < deadline + 2.0  # the round closed at its deadline, not when the straggler woke
    assert r2.bytes_down > 0 and r2.bytes_up > 0
    local = FedRun(cfg, base)
    local.round(1)
    local.round(2, drop={2})
    local.round(3, late={1})
    got = flower._tensors(out["result"].arrays)
    assert torch.equal(got["model"], local.server.broadcast["model"])
    # no wall-clock bound on the whole run (it measured 40-120 s with the machine idle or loaded): a round that
    # waited for the straggler instead of its deadline fails the round_s check above
    assert strat.server.version == 3


def test_cli_runs_rounds_and_refuses_a_bad_config(tmp_path, capsys):
    import json

    from sparsecomm.cli import main

    out = tmp_path / "fed.json"
    assert main(["federated", "--set", "clients=2", "rounds=2", "local_steps=1", "prompts_per_step=2", "prompts_per_client=10",
                 "eval_size=4", "grpo={'group_size': 2, 'max_new_tokens': 2, 'beta': 0.0}", "split=iid",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["round"] for r in data["rounds"]] == [1, 2] and all(r["applied"] for r in data["rounds"])
    assert "global" in data["final"]
    assert main(["federated", "--set", "aggregator=fedprox"]) == 2
    assert "mu > 0" in capsys.readouterr().out


def test_launch_train_mode_federated_runs_the_federated_cli(tmp_path):
    """`launch/train.py mode=federated FIELD=VALUE ... out=PATH` is `sparsecomm federated`; a recipe is refused."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "fed.json"
    cmd = [sys.executable, str(root / "launch/train.py"), "mode=federated", "clients=2", "rounds=1", "local_steps=1",
           "prompts_per_step=2", "prompts_per_client=10", "eval_size=4", "split=iid",
           "grpo={'group_size':2,'max_new_tokens':2,'beta':0.0}", f"out={out}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["config"]["clients"] == 2 and [x["round"] for x in data["rounds"]] == [1]
    r = subprocess.run([*cmd, "--config", "launch/recipes/demo.yaml"], env=env, capture_output=True, text=True,
                       timeout=60, cwd=root)
    assert r.returncode == 2 and "mode=federated takes FedConfig fields" in r.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_zeromq_transport_matches_in_process_rounds_with_a_leaver_and_hostile_requests(base):
    """The ZeroMQ transport: the server in this process, three client processes (`sparsecomm federated
    --transport zmq-client`); client 2 leaves after round 1. Junk, an unknown op, a bad client id and an
    upload for a round that is not open are answered with an error or a refusal and change nothing; rounds
    2 and 3 close at their deadline with the quorum of 2; the final model equals the in-process run of the
    same rounds (client 2 dropped in 2 and 3) bit for bit."""
    import subprocess
    import sys
    import threading

    import msgpack
    import zmq

    from sparsecomm.federated.zeromq import ZmqFedServer

    cfg = FedConfig(**SMALL, rounds=3, quorum=2, deadline_s=3.0, startup_timeout_s=120.0,
                    density_up=0.05, density_down=0.05)
    server = ZmqFedServer(cfg, to_wire(base, cfg.layout), "tcp://127.0.0.1:0", drain_s=20.0)
    ctx = zmq.Context()
    bad = ctx.socket(zmq.DEALER)
    bad.setsockopt(zmq.LINGER, 0)
    bad.connect(server.address)
    replies = []
    thread = threading.Thread(target=lambda: replies.append(server.serve()), daemon=True)
    thread.start()
    answers = []
    for req in (b"\xc1junk", msgpack.packb({"op": "steal", "client": 0}), msgpack.packb({"op": "poll", "client": 99}),
                msgpack.packb({"op": "upload", "client": 0, "round": 7, "payload": b"x", "weight": 1.0})):
        bad.send(req)
        assert bad.poll(10_000), "the server did not answer a bad request"
        answers.append(msgpack.unpackb(bad.recv(), raw=False))
    bad.close(0)
    ctx.term()
    assert [a["op"] for a in answers] == ["error", "error", "error", "ack"] and answers[3]["accepted"] is False
    assert "not the open round" in answers[3]["reason"]
    code = "from sparsecomm.cli import main; raise SystemExit(main())"
    procs = [subprocess.Popen([sys.executable, "-c", code, "federated", "--transport", "zmq-client", "--connect",
                               server.address, "--client", str(c), *(["--leave-after", "1"] if c == 2 else [])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in range(3)]
    try:
        thread.join(timeout=240)
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert not thread.is_alive() and replies, "the server did not finish its rounds"
    assert all(p.returncode == 0 for p in procs), outs
    r1, r2, r3 = replies[0]
    assert sorted(r1.accepted) == [0, 1, 2] and r1.applied, r1
    for r in (r2, r3):
        assert sorted(r.accepted) == [0, 1] and r.missing == [2] and r.applied, r
    assert server.errors == 3 and server.server.version == 3
    local = FedRun(cfg, base)
    local.round(1)
    local.round(2, drop={2})
    local.round(3, drop={2})
    assert torch.equal(server.server.broadcast["model"], local.server.broadcast["model"])


@pytest.mark.distributed
@pytest.mark.slow
def test_flower_deployment_runtime_with_superlink_and_supernodes_matches_in_process_rounds(tmp_path):
    """Flower's deployment runtime, as a user runs it: `flower-superlink`, one `flower-supernode
    --node-config partition-id=N` per client (each starts a ClientApp process per message) and
    `flwr run deploy/flower` with the run config; all on loopback, offline (no dependency install at run
    time). The final model (fingerprint) and the bytes of every round equal the in-process run's."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    pytest.importorskip("sparsecomm.federated.flower")
    from sparsecomm.federated.cli import base_state
    from sparsecomm.federated.zeromq import fingerprint
    from tests.integration.coordinator_helpers import free_port

    bindir = Path(sys.executable).parent
    if not all((bindir / b).exists() for b in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")):
        pytest.skip(f"Flower's deployment commands are not installed beside {sys.executable}")
    root = Path(__file__).resolve().parents[2]
    home = tmp_path / "flwr"
    link = free_port()
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\n'
                                      'insecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    sets = ("clients=2 rounds=2 local_steps=1 prompts_per_step=2 prompts_per_client=10 eval_size=4 split=iid quorum=2 "
            "density_up=0.05 density_down=0.05 grpo={'group_size':2,'max_new_tokens':2,'beta':0.0}")
    out = tmp_path / "fed.json"
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:  # own process group: its SuperExec / app children end with it
        log = open(tmp_path / f"{name}.log", "w")
        procs.append(subprocess.Popen([str(bindir / args[0]), *args[1:]], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    def listening(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
              "--disable-runtime-dependency-installation")
        for _ in range(150):  # bounded: 30 s
            if listening(link) or procs[0].poll() is not None:
                break
            time.sleep(0.2)
        assert listening(link), (tmp_path / "superlink.log").read_text()[-2000:]
        for i in range(2):
            start(f"node{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--port", str(free_port()), "--node-config", f"partition-id={i}")
        r = subprocess.run([str(bindir / "flwr"), "run", str(root / "deploy/flower"), "test", "--stream",
                            "--run-config", f'set="{sets}" out="{out}"'], env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0 and out.exists(), r.stdout[-3000:] + r.stderr[-2000:]
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # each group we started, leader and children
            for p in procs:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM:
                time.sleep(2)
        for p in procs:
            p.wait(timeout=20)
    got = json.loads(out.read_text())
    cfg = FedConfig.from_dict(got["config"])
    local = FedRun(cfg, base_state(cfg))
    reps = [local.round(rnd) for rnd in (1, 2)]
    assert [sorted(r["accepted"]) for r in got["rounds"]] == [[0, 1], [0, 1]]
    assert [(r["bytes_up"], r["bytes_down"]) for r in got["rounds"]] == [(r.bytes_up, r.bytes_down) for r in reps]
    assert got["rounds"][1]["bytes_down"] > 0
    assert got["model_sha256"] == fingerprint(local.server.broadcast)
