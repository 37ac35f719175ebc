"""Device and backend selection (sparsecomm.rl.build), unit-tested on CPU by faking CUDA's
availability; a mismatched device / backend is refused at start with the reason (never a hang);
the run records what it ran on. `test_*_on_cuda` run only where CUDA exists (benchmarks/gpu_check.sh
selects them with `-k cuda`)."""
import json

import pytest
import torch

from sparsecomm.rl import build

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend this host has `n` GPUs (nothing is allocated on them)."""
    def install(n: int, local_rank: int = 0):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    return install


def test_auto_is_cpu_without_cuda(fake_gpus):
    fake_gpus(0)
    assert build.select_device("auto") == torch.device("cpu")
    assert build.select_backend("auto", torch.device("cpu")) == "gloo"


def test_auto_is_cuda_local_rank_with_cuda(fake_gpus):
    fake_gpus(2, local_rank=1)
    assert build.select_device("auto") == torch.device("cuda", 1)
    assert build.select_device("cuda") == torch.device("cuda", 1)
    assert build.select_device("cuda:0") == torch.device("cuda", 0)
    assert build.select_device("cpu") == torch.device("cpu")  # cpu stays cpu on a GPU host
    assert build.select_backend("auto", torch.device("cuda", 1)) == "nccl"


def test_cuda_without_cuda_is_a_clear_error(fake_gpus):
    fake_gpus(0)
    with pytest.raises(ValueError, match=r"device=cuda but torch.cuda.is_available\(\) is False"):
        build.select_device("cuda")


def test_more_processes_than_gpus_is_a_clear_error(fake_gpus):
    # two ranks on one GPU would make NCCL fail or hang in the first collective
    fake_gpus(2, local_rank=2)
    with pytest.raises(ValueError, match=r"LOCAL_RANK 2 .* only 2 GPU"):
        build.select_device("cuda")
    with pytest.raises(ValueError, match=r"cuda:5 but only 2 GPU"):
        build.select_device("cuda:5")


@pytest.mark.parametrize("backend, device, reason", [
    ("gloo", "cuda:0", "host-only backend"),
    ("nccl", "cpu", "NCCL moves device memory only"),
])
def test_mismatched_backend_and_device_are_refused(backend, device, reason):
    with pytest.raises(ValueError, match=reason):
        build.select_backend(backend, torch.device(device))


def test_existing_process_group_must_fit_the_device(monkeypatch):
    # a caller's gloo group with a CUDA model: refused before any collective
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(build.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(build.dist, "get_backend", lambda group=None: "gloo")
    with pytest.raises(ValueError, match="host-only backend"):
        build.init_distributed("nccl", torch.device("cuda", 0))


def test_cuda_device_is_made_current_before_joining(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", seen.append)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert build.init_distributed("nccl", torch.device("cuda", 1)) == (0, 1)
    assert seen == [torch.device("cuda", 1)]


def test_transport_on_another_device_is_refused():
    class HostTransport:
        device, backend = torch.device("cpu"), "gloo"

    build.check_transport_device(HostTransport(), torch.device("cpu"))
    with pytest.raises(ValueError, match="HostTransport works on cpu but the model is on cuda:0"):
        build.check_transport_device(HostTransport(), torch.device("cuda", 0))
    build.check_transport_device(object(), torch.device("cuda", 0))  # no device attribute: host path (coordinator)


def test_runtime_info_names_versions():
    info = build.runtime_info(torch.device("cpu"), "gloo", 1)
    assert info["device"] == "cpu" and info["backend"] is None  # one process: no process group
    assert info["torch"] == torch.__version__ and info["cuda"] == torch.version.cuda
    assert "nccl" in info and (info["nccl"] is None or isinstance(info["nccl"], str))
    assert build.runtime_info(torch.device("cpu"), "gloo", 2)["backend"] == "gloo"


def test_runtime_info_on_a_faked_gpu(fake_gpus, monkeypatch):
    # the CUDA branch runs here too: a CPU build has no NCCL, which must read as None, not raise
    fake_gpus(1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    info = build.runtime_info(torch.device("cuda", 0), "nccl", 2)
    assert info["device"] == "cuda:0" and info["device_name"] == "Fake GPU" and info["backend"] == "nccl"
    if torch.version.cuda is None:
        assert info["nccl"] is None


def test_registries_cover_the_modes():
    from sparsecomm.rl.config import COMMS, DDP_COMMS, OPTIMIZERS

    assert set(build.OPTIMIZER_BUILDERS) == set(OPTIMIZERS)
    assert set(build.TRANSPORTS) | set(DDP_COMMS) | {"local"} == set(COMMS)
    assert set(build.HOOKS) < set(DDP_COMMS)


# ------------------------------------------------------------------ the trainer refuses at start
def _cfg(tmp_path, **kw):
    pytest.importorskip("transformers")
    from sparsecomm.rl.config import TrainConfig

    return TrainConfig(run_dir=str(tmp_path / "run"), sft_steps=2, rl_steps=2, prompts_per_step=2, eval_size=4,
                       console_every=1000, grpo={"group_size": 2, "max_new_tokens": 2}, task_kwargs={"digits": 1}, **kw)


def test_trainer_refuses_cuda_without_cuda_before_building(tmp_path, fake_gpus):
    from sparsecomm.rl.trainer import Trainer

    fake_gpus(0)
    with pytest.raises(ValueError, match="torch.cuda.is_available"):
        Trainer(_cfg(tmp_path, device="cuda"))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="NCCL moves device memory only"):
        Trainer(_cfg(tmp_path, device="cpu", backend="nccl"))


def test_trainer_refuses_gloo_for_a_gpu_model(tmp_path, fake_gpus):
    from sparsecomm.rl.trainer import Trainer

    fake_gpus(1)
    with pytest.raises(ValueError, match="host-only backend"):
        Trainer(_cfg(tmp_path, device="auto", backend="gloo"))


def _run(cfg):
    from sparsecomm.rl.trainer import Trainer

    t = Trainer(cfg)
    try:
        summary = t.train()
    finally:
        t.close()
    return t, summary


def test_a_run_records_device_backend_and_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t, summary = _run(_cfg(tmp_path, device="cpu"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    for rt in (config["runtime"], summary["runtime"], saved["runtime"]):
        assert rt["device"] == "cpu" and rt["torch"] == torch.__version__ and "cuda" in rt and "nccl" in rt
    assert config["device"] == "cpu" and config["backend"] == "auto"
    assert all(p.device.type == "cpu" for p in t.model.parameters())


@needs_cuda
@pytest.mark.parametrize("optimizer", ["aspg", "adamw"])
def test_trainer_runs_on_cuda(tmp_path, monkeypatch, optimizer):
    # model, optimizer state (ASPG's residual and importance too) and sampling on the GPU
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t, summary = _run(_cfg(tmp_path, device="cuda", optimizer=optimizer, rl_steps=3))
    assert summary["runtime"]["device"].startswith("cuda") and summary["runtime"]["cuda"] is not None
    assert all(p.device.type == "cuda" for p in t.model.parameters())
    rows = [json.loads(line) for line in (tmp_path / "run" / "stats_rank0.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["metrics"]["train/reward"] == r["metrics"]["train/reward"] for r in rows)


@needs_cuda
def test_resume_on_cuda_restores_and_continues(tmp_path, monkeypatch):
    # the checkpoint loads to the host (RNG states must stay host tensors) and moves to the GPU; bit
    # equality with an uninterrupted run is not asserted on CUDA: embedding backward uses atomics,
    # so two CUDA runs may differ in the last bits unless torch.use_deterministic_algorithms is on
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _run(_cfg(tmp_path, device="cuda", rl_steps=2, checkpoint_every=2))
    resumed, _ = _run(_cfg(tmp_path, device="cuda", rl_steps=4, checkpoint_every=2, resume=True))
    assert all(p.device.type == "cuda" for p in resumed.model.parameters())
    rows = (tmp_path / "run" / "stats_rank0.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]
