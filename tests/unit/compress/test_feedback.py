"""Error feedback conserves mass exactly and round-trips its state."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsecomm.codec import roundtrip_values
from sparsecomm.compress import ErrorFeedback, SampledThreshold, TopK


@given(seed=st.integers(0, 2**16), value=st.sampled_from(["fp32", "bf16", "fp16", "int8"]), k=st.integers(0, 300))
def test_sent_plus_residual_equals_compensated_input_bitwise(seed, value, k):
    g = torch.Generator().manual_seed(seed)
    ef = ErrorFeedback()
    for _ in range(3):
        u = torch.randn(30, 10, generator=g) * 1e-3
        e = ef.compensate("w", u).clone()
        d = roundtrip_values(TopK().select(e, k), value)
        ef.update("w", d)
        assert torch.equal(ef.residual("w") + d.to_dense(), e)


def test_nothing_is_lost_over_many_steps():
    """Sum of everything sent + final residual == sum of all updates (up to fp32 accumulation)."""
    ef, sent, total = ErrorFeedback(), torch.zeros(5000, dtype=torch.float64), torch.zeros(5000, dtype=torch.float64)
    for step in range(50):
        u = torch.randn(5000) * 1e-3
        total += u.double()
        d = SampledThreshold(seed=step).select(ef.compensate("w", u), 50)
        ef.update("w", d)
        sent += d.to_dense().double()
    # each of the 50 fp32 `residual += u` steps rounds by at most half an ulp of the residual
    bound = 50 * torch.finfo(torch.float32).eps * float(total.abs().max())
    assert float((sent + ef.residual("w").double() - total).abs().max()) <= bound


def test_lossless_sent_positions_become_zero():
    ef = ErrorFeedback()
    e = ef.compensate("w", torch.randn(100))
    d = TopK().select(e, 10)
    ef.update("w", d)
    assert bool((ef.residual("w")[d.indices] == 0).all())


def test_state_dict_round_trip_is_exact():
    ef = ErrorFeedback()
    ef.compensate("a", torch.randn(4, 4))
    ef.compensate("b", torch.randn(3))
    clone = ErrorFeedback()
    clone.load_state_dict(ef.state_dict())
    for name in ("a", "b"):
        assert torch.equal(clone.residual(name), ef.residual(name))
        assert clone.residual(name).data_ptr() != ef.residual(name).data_ptr()


def test_shape_mismatch_is_an_error():
    ef = ErrorFeedback()
    ef.compensate("w", torch.randn(4))
    with pytest.raises(ValueError, match="shape"):
        ef.compensate("w", torch.randn(5))
