"""SparseExchange, FlatLayout, paths and the scale model in one process (P = 1 and fakes)."""
import pytest
import torch

from sparsecomm import SparseDelta
from sparsecomm.codec import CodecError
from sparsecomm.compress import ThresholdReuse, TopK
from sparsecomm.exchange import DenseSink, FlatLayout, LocalTransport, SparseExchange, predicted_bytes
from sparsecomm.simulate import Calibration, Link, predict


@pytest.mark.parametrize("path", ["allgather", "split", "dense"])
def test_one_worker_conserves_mass_on_every_path(path):
    g = torch.Generator().manual_seed(0)
    e = torch.randn(5000, generator=g)
    before = e.clone()
    out = torch.zeros(5000)
    ex = SparseExchange(value_codec="bf16", paths=(path,))
    assert ex.exchange("w", e, 100, DenseSink(out)) == path
    assert torch.equal(out + e, before)  # what was applied left the residual, exactly (bf16 error stays in e)
    assert int(torch.count_nonzero(out)) == (5000 if path == "dense" else 100)


class FailingTransport(LocalTransport):
    def all_gather_bytes(self, payload):
        raise ConnectionError("peer vanished")


def test_a_failed_exchange_loses_nothing():
    e = torch.randn(1000)
    before = e.clone()
    out = torch.zeros(1000)
    with pytest.raises(ConnectionError):
        SparseExchange(FailingTransport(), paths=("allgather",)).exchange("w", e, 50, DenseSink(out))
    assert torch.equal(e, before) and not out.any()  # residual untouched, nothing applied


class LyingTransport(LocalTransport):
    def all_gather_bytes(self, payload):
        return [memoryview(payload[:-4] + b"\0\0\0\0")]


def test_a_corrupt_message_is_a_codec_error_with_nothing_applied():
    e = torch.randn(1000)
    before = e.clone()
    out = torch.zeros(1000)
    with pytest.raises(CodecError, match="rank 0"):
        SparseExchange(LyingTransport(), paths=("allgather",)).exchange("w", e, 50, DenseSink(out))
    assert torch.equal(e, before) and not out.any()


def test_decoded_deltas_do_not_alias_the_receive_buffer():
    """A later exchange reuses the transport's buffers: what an earlier one applied must not change."""
    from sparsecomm.codec import decode, encode

    d = SparseDelta(torch.tensor([1, 5, 9]), torch.tensor([1.0, 2.0, 3.0]), (10,))
    buf = bytearray(encode(d, "raw", "fp32"))
    got = decode(memoryview(buf))
    buf[:] = bytes(len(buf))  # the transport overwrites its receive buffer
    assert got.indices.tolist() == [1, 5, 9] and got.values.tolist() == [1.0, 2.0, 3.0]


def test_state_dict_round_trip_continues_identically():
    def run(ex, e, steps):
        outs = []
        for _ in range(steps):
            e.add_(torch.randn(4000, generator=gen))
            out = torch.zeros(4000)
            ex.exchange("w", e, 40, DenseSink(out))
            outs.append(out)
        return outs

    gen = torch.Generator().manual_seed(1)
    a, e = SparseExchange(paths=("split",), seed=3), torch.zeros(4000)
    run(a, e, 3)
    state, e_saved, gen_state = a.state_dict(), e.clone(), gen.get_state()
    first = run(a, e, 3)
    b = SparseExchange(paths=("split",), seed=99)
    b.load_state_dict(state)
    gen.set_state(gen_state)
    again = run(b, e_saved, 3)
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_flat_layout_master_weights_keep_sub_ulp_updates():
    """bf16 weights: an update below half a bf16 ulp is rounded away by `w += u`, but accumulates in the
    fp32 master and shows once it adds up, so nothing the sender removed from its residual is lost."""
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    master = w.detach().float().clone()
    layout = FlatLayout([w], [master])
    tiny = SparseDelta(torch.tensor([0, 2]), torch.tensor([1e-3, 1e-3]), (4,))  # bf16 ulp at 1.0 is 7.8e-3
    for _ in range(10):
        layout.add_sparse(tiny, 1.0)
    torch.testing.assert_close(master[[0, 2]], torch.tensor([1.01, 1.01]), rtol=0, atol=1e-6)
    assert w[0].item() == torch.tensor(1.01).bfloat16().item() != 1.0
    plain = torch.ones(4, dtype=torch.bfloat16)
    for _ in range(10):
        tiny.add_to(plain)
    assert plain[0].item() == 1.0  # what `w += u` in bf16 does: every step rounded away


def test_threshold_reuse_selects_near_k_with_one_pass_and_re_estimates_on_drift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g)
    sel = ThresholdReuse(reuse_tolerance=0.1)
    k = 2000
    d0 = sel.select(x, k)
    assert sel.estimated == 1 and k <= d0.k <= 1.05 * k
    x2 = x + 0.01 * torch.randn(200_000, generator=g)  # a slowly drifting residual
    d1 = sel.select(x2, k)
    assert sel.reused == 1 and 0.9 * k <= d1.k <= 1.1 * k
    exact = set(TopK().select(x2, k).indices.tolist())
    assert len(exact & set(d1.indices.tolist())) >= 0.85 * k  # it is (nearly) the top-k
    d2 = sel.select(x2 * 3, k)  # scale jumps: 3x the old threshold would select almost everything
    assert d2.k <= 1.1 * k and sel.estimated + sel.reused == 3


def test_bytes_model_split_stays_near_3k_while_allgather_grows():
    n, k = 124_439_808, 1_244_398
    for P in (8, 64, 512):
        split = predicted_bytes("split", n, k, P, 2, "raw")  # k/P to each owner + the owners' 2k/P each
        assert split <= 3 * k * 6 + 2 * P * 160
        assert predicted_bytes("split", n, k, P, 2, "raw", owner_share=1.0) <= 2 * k * 6 + 2 * P * 160
        assert predicted_bytes("allgather", n, k, P, 2, "raw") == pytest.approx((P - 1) * (k * 6 + 160))


def test_scale_model_orders_paths_as_the_bytes_say():
    cal = Calibration(select_per_elem=1e-9, encode_per_entry=1e-8, decode_per_entry=1e-8, apply_per_entry=1e-8,
                      reduce_per_elem=5e-10, matmul_flops=1e10)
    slow = Link(0.1)
    t = {p: predict(p, 124_439_808, 0.01, 64, slow, cal)["total_s"] for p in ("dense", "allgather", "split")}
    assert t["split"] < t["allgather"] < t["dense"]
    assert predict("split", 124_439_808, 0.01, 64, slow, cal, cpu_share=4)["cpu_s"] == pytest.approx(
        4 * predict("split", 124_439_808, 0.01, 64, slow, cal)["cpu_s"])
