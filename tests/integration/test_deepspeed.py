"""DeepSpeed 0.19.8 ZeRO training with sparsecomm's communication, 2 gloo ranks on CPU.

One spawn runs every scenario (DeepSpeed's import and engine set-up cost seconds each; see
deepspeed_worker.py); the tests below check its results. Refusals are checked in-process.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("deepspeed")

from sparsecomm.integrations import deepspeed as sds  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every rank's results; the ZeRO-3 patches the ranks pushed to this process (a direct subscriber);
    and what rollout workers of a relay coordinator (running here) held: one that joined as soon as
    version 1 existed and followed every version, one that joined at the end (a snapshot)."""
    import zmq

    from sparsecomm.exchange.coordinator.relay import layout_fingerprint
    from sparsecomm.exchange.zmq_client import RolloutClient
    from tests.distributed.helpers import run_workers
    from tests.integration.coordinator_helpers import running_coordinator
    from tests.integration.deepspeed_worker import STEPS, run_all, tiny_model

    d = tmp_path_factory.mktemp("ds")
    model = tiny_model()
    fp, numel = layout_fingerprint((n, p.shape) for n, p in model.named_parameters()), sum(p.numel() for p in model.parameters())
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    follower: dict = {}

    def follow(endpoint):  # a rollout worker from the start: joins once version 1 exists, applies every version
        try:
            deadline = time.monotonic() + 300  # bounded: a stalled relay fails the test, it does not hang it
            c = RolloutClient(endpoint, "rollout-early", fp, numel, timeout_s=60, heartbeat_s=0.2)
            c.connect(wait_s=300)  # as soon as version 1 exists
            follower["joined_at"] = c.version
            while c.version < STEPS + 1 and time.monotonic() < deadline:
                c.poll(1.0)
            follower.update(weights=c.weights.clone(), updates=c.updates, hash=c.hash)
            c.close()
        except BaseException as e:
            follower["error"] = e

    try:
        with running_coordinator(relay=True) as coord:
            t = threading.Thread(target=follow, args=(coord.endpoint,), daemon=True)
            t.start()
            out = run_workers(run_all, 2, d, str(d / "ckpt"), f"tcp://127.0.0.1:{port}", coord.endpoint)
            t.join(330)
            late = RolloutClient(coord.endpoint, "rollout-late", fp, numel, timeout_s=30)
            late.connect()
            follower["late"] = late.weights.clone()
            follower["relay"] = {"version": coord.state.version, "hash": coord.state.hash,
                                 "published_bytes": coord.relay.published_bytes}
            late.close()
        patches = []
        while pull.poll(2000):  # queued by zmq's I/O thread while the ranks ran
            patches.append(pull.recv_multipart())
    finally:
        pull.close(linger=0)
        ctx.term()
    return out, patches, follower


@pytest.fixture(scope="module")
def ranks(results):
    return results[0]


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_replicas(results, scenario: str, field: str) -> None:
    assert_equal(results[0][scenario][field], results[1][scenario][field])


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_aspg_under_zero0_equals_our_aspg_bit_for_bit(ranks, dtype):
    for r in ranks:
        s = r[f"aspg0_{dtype}"]
        assert s["allreduce_on"] is False  # DeepSpeed's backward all-reduce is off: ASPG communicates
        assert s["path"] == "allgather"  # 5%: the sparse path ran
        assert_equal(s["ds"], s["ref"])  # DeepSpeed engine + ASPG == our own ASPG loop, same seed and data
    assert_replicas(ranks, f"aspg0_{dtype}", "ds")


@pytest.mark.distributed
@pytest.mark.slow
def test_aspg_checkpoint_resumes_exactly(ranks):
    for r in ranks:  # each rank's moments and residual come back from its own file
        assert_equal(r["aspg0_resume"]["resumed"], r["aspg0_resume"]["ref"])


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_compressed_reduction_at_density_1_equals_deepspeed_dense(ranks, stage):
    for r in ranks:
        s = r[f"z{stage}_density1"]
        assert_equal(s["sparse"], s["dense"])


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_compressed_reduction_at_1_percent(ranks, stage):
    s0, s1 = ranks[0][f"z{stage}_density001"], ranks[1][f"z{stage}_density001"]
    assert_replicas(ranks, f"z{stage}_density001", "weights")
    assert any(not torch.equal(s0["weights"][k], s0["dense_final"][k]) for k in s0["weights"])  # compressed != dense
    assert s0["metrics"]["comm/path"] == "allgather"
    # 808 parameters: headers weigh; ZeRO-2's five 200-entry buckets carry one header each
    assert 0 < s0["metrics"]["comm/sent_bytes"] < s0["metrics"]["comm/dense_equiv_bytes"] / (3 if stage == 2 else 10)
    assert s0["records"] and [a["key"] for a in s0["records"]] == [b["key"] for b in s1["records"]]
    if stage == 2:
        assert len(s0["records"]) > 1  # small buckets: several, each with its own residual
    for a, b in zip(s0["records"], s1["records"]):  # step 1: the residual started empty
        assert torch.equal(a["mean"], b["mean"])  # every rank applies the same mean
        # what was applied (P x mean) + what stayed behind == the dense sum of the gradients
        torch.testing.assert_close(2 * a["mean"] + a["residual"] + b["residual"], a["grad"] + b["grad"],
                                   rtol=0, atol=1e-7)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_sparse_partition_all_gather(ranks, stage):
    """ZeRO-1/2 with param_density: at 1.0 the result is DeepSpeed's dense run bit for bit; at 5% replicas stay
    bit-identical while the published weights lag the masters, every byte of the lag is kept (once the masters
    stop moving the published copies reach them exactly), and the step sends a fraction of the dense bytes."""
    key = f"z{stage}_params005"
    for r in ranks:
        assert_equal(r[key]["full"], r[key]["dense"])
        assert r[key]["lag_nonzero"] > 0  # the master leads the published weights: entries still to send
        assert r[key]["caught_up_equals_masters"]
    assert_replicas(ranks, key, "lagging")
    assert_replicas(ranks, key, "final")
    m = ranks[0][key]["metrics"]
    assert m["comm/param_entries"] > 0
    # 808 parameters at 5% (headers weigh at this size); DeepSpeed dense: 4 B x 808 per all-reduce + gather
    assert 0 < m["comm/sent_bytes"] < m["comm/dense_equiv_bytes"] / 2
    for r in ranks:
        assert_equal(r["z2_params_resume"]["resumed"], r["z2_params_resume"]["ref"])


@pytest.mark.distributed
@pytest.mark.slow
def test_sparse_partition_all_gather_bf16_zero2(ranks):
    """bf16 weights over fp32 masters (ZeRO-2): at density 1.0 DeepSpeed's dense result bit for bit; at 5% the
    published bf16 copies lag, replicas stay identical, and once the masters stop moving the published copies
    reach the masters rounded to bf16 exactly (what a dense all-gather would publish)."""
    key = "z2_bf16_params005"
    for r in ranks:
        assert_equal(r[key]["full"], r[key]["dense"])
        assert r[key]["held_dtype"] == "torch.bfloat16" and r[key]["lag_nonzero"] > 0
        assert r[key]["caught_up_equals_masters"]
        assert all(v.dtype == torch.bfloat16 for v in r[key]["final"].values())
    assert_replicas(ranks, key, "lagging")
    assert_replicas(ranks, key, "final")
    assert ranks[0][key]["metrics"]["comm/param_entries"] > 0


@pytest.mark.distributed
@pytest.mark.slow
def test_compressed_reduction_bf16_zero1_and_resume(ranks):
    assert ranks[0]["z1_bf16_density001"]["optimizer"] == "BF16_Optimizer"  # the engine's allreduce_bucket path
    assert_replicas(ranks, "z1_bf16_density001", "weights")
    for r in ranks:  # residuals resume from each rank's own file
        assert_equal(r["z2_resume"]["resumed"], r["z2_resume"]["ref"])


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_rollout_sync_reassembles_the_gathered_bf16_model(results):
    import msgpack

    ranks, patches, _ = results
    z = [r["zero3"] for r in ranks]
    assert len(patches) == 2 * len(z[0]["sent"])  # every rank, every version
    sub = sds.RolloutAssembler()
    for header, payload in sorted(patches, key=lambda m: msgpack.unpackb(m[0])["version"]):
        h = msgpack.unpackb(header)
        sub.apply(payload, h["version"], h["rank"])
    assert_equal(sub.tensors, z[0]["ref"])  # bit for bit the gathered model, in bf16
    numel = z[0]["model_numel"]
    assert sum(r["sent"][0]["changed_entries"] for r in z) == numel  # the anchor: every entry once
    later = [r["sent"][-1]["changed_entries"] for r in z]
    assert 0 < sum(later) < numel  # a later version: only entries whose bf16 bits changed
    for r in z:  # a rank holds its partition's bf16 copy (about half the model in bf16 at 2 ranks), never the model
        assert r["held_bytes"] <= 2 * (numel // 2 + 64 * 4)
        # temporaries: one tensor's partition at a time (bf16 values + int64 indices), not the model
        assert r["peak_temp_bytes"] <= 10 * r["max_partition"] < 2 * 4 * numel


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_rollout_sync_through_the_relay_coordinator(results):
    """The same patches through `sparsecomm coordinator --relay`: a rollout worker that joined as soon as
    version 1 existed and followed every version and one that joined at the end (a bf16 snapshot) both
    hold the gathered bf16 model, bit for bit."""
    ranks, _, follower = results
    assert "error" not in follower, follower.get("error")
    z = [r["zero3"] for r in ranks]
    ref = torch.cat([t.reshape(-1) for t in z[0]["ref"].values()])  # named_parameters order: the relay's layout
    relay = follower["relay"]
    assert relay["version"] == len(z[0]["relayed"]) and [s["version"] for s in z[0]["relayed"]] == \
        list(range(1, relay["version"] + 1))
    assert follower["updates"] == relay["version"] - follower["joined_at"]  # then one patch per version
    assert torch.equal(follower["weights"], ref) and follower["hash"] == relay["hash"]
    assert torch.equal(follower["late"], ref)
    for r in z:  # a rank sends the relay what it sends a direct subscriber: the same patches
        assert [s["changed_entries"] for s in r["relayed"]] == [s["changed_entries"] for s in r["sent"]]


def test_unsupported_version_is_a_clear_error():
    assert sds.check_version("0.19.8") == "0.19.8"
    for bad in ("0.19.6", "0.20.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=f"DeepSpeed {bad} is not supported.*>=0.19.8,<0.20.0"):
            sds.check_version(bad)


def test_unsupported_combinations_fail_at_start_with_the_reason():
    from sparsecomm.optim.aspg import ASPG

    opt = ASPG(torch.nn.Linear(4, 4).parameters(), density=0.1)
    with pytest.raises(ValueError, match="ASPG cannot run under ZeRO stage 3: its Adam moments"):
        sds.check_combination({"zero_optimization": {"stage": 3}}, "aspg", opt)
    with pytest.raises(ValueError, match="ASPG cannot run under ZeRO stage 1"):
        sds.check_combination({"zero_optimization": {"stage": 1}}, "aspg", opt)
    with pytest.raises(ValueError, match="bf16.enabled false"):
        sds.check_combination({"bf16": {"enabled": True}}, "aspg", opt)
    with pytest.raises(ValueError, match="communicates itself"):
        sds.check_combination({}, "sparse_grad", opt)
    with pytest.raises(ValueError, match="ZeRO-3: its gradient reduce-scatter"):
        sds.check_combination({"zero_optimization": {"stage": 3}}, "sparse_grad")
    with pytest.raises(ValueError, match="contiguous_gradients"):
        sds.check_combination({"zero_optimization": {"stage": 2, "contiguous_gradients": False}}, "sparse_grad")
    with pytest.raises(ValueError, match="density must be in"):
        sds.SparseReduceState(density=0)
    with pytest.raises(ValueError, match="param_density must be None"):
        sds.SparseReduceState(param_density=0.0)
    from sparsecomm.rl.config import TrainConfig

    with pytest.raises(ValueError, match="param_density is for engine=deepspeed"):
        TrainConfig(param_density=0.01)
    with pytest.raises(ValueError, match="needs comm=hook, zero_stage 1 or 2"):
        TrainConfig(engine="deepspeed", comm="hook", optimizer="adamw", zero_stage=0, param_density=0.01)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("recipe,extra", [("deepspeed_aspg", []), ("deepspeed_zero2", []),
                                          ("deepspeed_zero2", ["param_density=0.01"])],
                         ids=["aspg", "zero2", "zero2-sparse-params"])
def test_train_py_with_engine_deepspeed(tmp_path, recipe, extra):
    """launch/train.py engine=deepspeed under torchrun: the recipe trains and sends ~1% of the dense bytes
    (with param_density, ZeRO-2's partition all-gather included; without it, that dense all-gather is
    counted on top). ZeRO-0 + ASPG is the same computation as
    the ddp engine's ASPG: every per-step metric but timings equals it (the SFT warm start's last gradient
    once leaked into the first RL step under DeepSpeed)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    port = 29200 + os.getpid() % 400 + 3 * (recipe == "deepspeed_zero2") + len(extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "launch/train.py",
           "--config", "launch/recipes/demo.yaml", "--config", f"launch/recipes/{recipe}.yaml", f"run_dir={tmp_path}",
           "sft_steps=20", "rl_steps=6", "prompts_per_step=4", "grpo.group_size=4", "eval_size=20",
           "console_every=100", "device=cpu", *extra]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    def rows_of(run_dir, rank):
        return [json.loads(line)["metrics"] for line in (run_dir / f"stats_rank{rank}.jsonl").read_text().splitlines()]

    if recipe == "deepspeed_aspg":
        ref = tmp_path / "ddp"
        ddp_cmd = [c for c in cmd if c not in ("--config", f"launch/recipes/{recipe}.yaml")] + [
            f"run_dir={ref}", "comm=aspg", "optimizer=aspg", "density=0.01"]
        ddp_cmd.insert(ddp_cmd.index("launch/train.py") + 1, "--config")  # keep demo.yaml's --config
        r = subprocess.run(ddp_cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        for a, b in zip(rows_of(tmp_path, 0), rows_of(ref, 0), strict=True):
            same = {k for k in a if not k.startswith(("timing/", "memory/")) and not k.endswith("cpu_s")}
            assert {k: a[k] for k in same} == {k: b[k] for k in same}
    for rank in range(2):
        rows = rows_of(tmp_path, rank)
        assert len(rows) == 6
        m = rows[-1]
        if recipe == "deepspeed_zero2" and not extra:  # DeepSpeed's dense partition all-gather is counted too
            gather = m["comm/deepspeed_allgather_bytes"]
            assert gather == m["comm/dense_equiv_bytes"] // 2  # (P-1)/P x 4 B x N: half the ring all-reduce
            assert m["comm/path"] == "allgather" and gather < m["comm/sent_bytes"] < gather + m["comm/dense_equiv_bytes"] / 20
        else:
            assert m["comm/path"] == "allgather" and 0 < m["comm/sent_bytes"] < m["comm/dense_equiv_bytes"] / 20
        assert m["sparsity/fp32_exact/global"] < 1.0  # the weights moved
        if extra:
            assert m["comm/param_entries"] > 0  # the partition all-gather ran sparse


@pytest.mark.distributed
@pytest.mark.slow
def test_train_py_zero3_publishes_every_step_through_the_relay(tmp_path):
    """launch/train.py engine=deepspeed zero_stage=3 rollout_relay=...: dense ZeRO-3 training (it used to fail at
    the sparsity tracker: ZeRO-3 parameters are empty outside forward; the trackers see each rank's partition)
    and, after every RL step, each rank's changed bf16 entries go to a relay coordinator; a rollout worker that
    joins at the end gets the relay's copy."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from sparsecomm.exchange.zmq_client import RolloutClient
    from sparsecomm.rl.config import TrainConfig
    from tests.integration.coordinator_helpers import running_coordinator

    with pytest.raises(ValueError, match="rollout_relay publishes ZeRO-3 partitions"):
        TrainConfig(rollout_relay="tcp://127.0.0.1:5555")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    steps = 4
    with running_coordinator(relay=True) as coord:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(29700 + os.getpid() % 200), "launch/train.py", "--config", "launch/recipes/demo.yaml",
               "--config", "launch/recipes/deepspeed_zero3.yaml", f"rollout_relay={coord.endpoint}", f"run_dir={tmp_path}",
               "sft_steps=10", f"rl_steps={steps}", "prompts_per_step=4", "grpo.group_size=4", "eval_size=20",
               "console_every=100", "device=cpu"]
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert coord.state.version == steps + 1  # the anchor, then one version per RL step
        assert coord.state.fingerprint.startswith("layout-")  # relay.layout_fingerprint of the model's tensors
        late = RolloutClient(coord.endpoint, "rollout-late", coord.state.fingerprint, coord.state.numel, timeout_s=30)
        late.connect()  # the relay's copy: the trained model's partitions, reassembled
        assert late.version == steps + 1 and late.weights.abs().sum() > 0
        late.close()
    for rank in range(2):
        rows = [json.loads(line)["metrics"] for line in (tmp_path / f"stats_rank{rank}.jsonl").read_text().splitlines()]
        assert [m["rollout/version"] for m in rows] == list(range(2, steps + 2))
        assert all(0 < m["rollout/sent_bytes"] for m in rows) and rows[-1]["sparsity/fp32_exact/global"] < 1.0
