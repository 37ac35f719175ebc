"""JSONL round trip, the Prometheus endpoint scraped over HTTP, the report command."""
import json
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sparsecomm.cli import main
from sparsecomm.track import ConsoleSink, JsonlSink, PrometheusSink, Recorder, StepStats, read_jsonl


def sample_stats(step, rank=0):
    return StepStats(step=step, rank=rank, world_size=2, run="t", metrics={
        "train/reward": 0.1 * step, "train/loss": 1.0 / (step + 1),
        "sparsity/fp32_exact/global": 0.01, "sparsity/bf16_view/global": 0.97,
        "sparsity/fp32_exact/kind/attention": 0.02, "sparsity/bf16_view/kind/mlp": 0.98,
        "sparsity_k10/bf16_view/global": 0.6,
        "comm/sent_bytes": 1000, "comm/recv_bytes": 2000, "comm/dense_equiv_bytes": 50000, "comm/path": "sparse",
        "comm/density": 0.01, "timing/select_s": 0.02, "timing/exchange_s": 0.05, "timing/dense_allreduce_s": 0.4,
        "rank/grad/entropy/h.0.attn.c_attn.weight": 3.0, "rank/grad/stable/h.0.attn.c_attn.weight": 1.5,
        "rank/grad/random_entropy/h.0.attn.c_attn.weight": 40.0, "rank/grad/random_stable/h.0.attn.c_attn.weight": 12.0,
        "rank/grad/bound_min_mn/h.0.attn.c_attn.weight": 64, "rank/grad/bound_tokens/h.0.attn.c_attn.weight": 32,
        "hot/frac_changed_gt_half/global": 0.1, "memory/aspg_residual_bytes": 4096, "memory/aspg_state_bytes": 20480})


def test_jsonl_round_trip(tmp_path):
    sink = JsonlSink(tmp_path / "rank0.jsonl")
    for step in range(3):
        sink.write(sample_stats(step))
    sink.close()
    back = read_jsonl(tmp_path / "rank0.jsonl")
    assert [s.step for s in back] == [0, 1, 2] and back[2].metrics == sample_stats(2).metrics
    json.loads((tmp_path / "rank0.jsonl").read_text().splitlines()[0])  # plain JSON lines
    sink = JsonlSink(tmp_path / "rank0.jsonl", mode="a")  # a resume appends
    sink.write(sample_stats(3))
    sink.close()
    assert [s.step for s in read_jsonl(tmp_path / "rank0.jsonl")] == [0, 1, 2, 3]
    JsonlSink(tmp_path / "rank0.jsonl").close()  # a new run starts afresh
    assert read_jsonl(tmp_path / "rank0.jsonl") == []


def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_prometheus_endpoint_serves_the_right_values():
    sink = PrometheusSink(port=0, rank=1, run="t")
    try:
        sink.write(sample_stats(1, rank=1))
        sink.write(sample_stats(2, rank=1))
        got = scrape(sink.port)
        base = (("rank", "1"), ("run", "t"))
        assert got[("sparsecomm_sent_bytes_total", base)] == 2000
        assert got[("sparsecomm_received_bytes_total", base)] == 4000
        assert got[("sparsecomm_dense_equivalent_bytes_total", base)] == 100000
        assert got[("sparsecomm_step", base)] == 2
        assert got[("sparsecomm_reward", base)] == pytest.approx(0.2)
        lab = lambda **kw: tuple(sorted({"rank": "1", "run": "t", **kw}.items()))  # noqa: E731
        assert got[("sparsecomm_update_sparsity_ratio", lab(definition="bf16_view", layer_kind="all"))] == 0.97
        assert got[("sparsecomm_update_sparsity_ratio", lab(definition="fp32_exact", layer_kind="attention"))] == 0.02
        assert got[("sparsecomm_update_sparsity_k_steps_ratio", lab(definition="bf16_view", k_steps="10"))] == 0.6
        assert got[("sparsecomm_phase_seconds_count", lab(phase="select"))] == 2
        assert got[("sparsecomm_phase_seconds_sum", lab(phase="dense_allreduce"))] == pytest.approx(0.8)
        assert got[("sparsecomm_exchange_path_total", lab(path="sparse"))] == 2
        assert got[("sparsecomm_memory_bytes", lab(buffer="aspg_residual"))] == 4096
        assert got[("sparsecomm_memory_bytes", lab(buffer="aspg_state"))] == 20480
    finally:
        sink.close()


def test_two_sinks_do_not_share_a_registry():
    a, b = PrometheusSink(port=None), PrometheusSink(port=None)
    a.write(sample_stats(1))
    assert b.registry.get_sample_value("sparsecomm_sent_bytes_total", {"rank": "0", "run": ""}) is None
    assert a.registry.get_sample_value("sparsecomm_sent_bytes_total", {"rank": "0", "run": ""}) == 1000


def test_console_line(capsys):
    Recorder([ConsoleSink()]).record(sample_stats(3))
    out = capsys.readouterr().out
    assert "step     3" in out and "sparsity fp32 1.00%" in out and "bf16 97.00%" in out and "sent 1,000 B" in out


def test_report_command_makes_figures(tmp_path):
    for rank in (0, 1):
        sink = JsonlSink(tmp_path / f"stats_rank{rank}.jsonl")
        for step in range(20):
            sink.write(sample_stats(step, rank))
        sink.close()
    np.savez_compressed(tmp_path / "hot_maps_rank0.npz", **{"step20/h.0.attn.c_attn.weight": np.random.rand(8, 8)})
    assert main(["report", str(tmp_path)]) == 0
    out = tmp_path / "report"
    for name in ("sparsity.png", "layers.png", "hot.png", "rank.png", "comm.png"):
        assert (out / name).stat().st_size > 5000, name
    summary = (out / "summary.md").read_text()
    assert "bf16_view" in summary and "50.0x more" in summary and "first 0.0000, last 1.9000" in summary


def test_report_without_jsonl_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl"):
        main(["report", str(tmp_path)])
