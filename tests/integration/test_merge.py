"""`sparsecomm merge`: delta files (manifest + the project's codec) and their composition, with
TIES through mergekit on save_pretrained checkpoints (tiny GPT-2, offline, CPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from sparsecomm import merge as M  # noqa: E402
from sparsecomm.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base, and two 'fine-tunes' with disjoint supports (a: even positions, b: odd positions)."""
    from sparsecomm.rl.models import build_model, char_tokenizer

    tmp = tmp_path_factory.mktemp("merge")
    tok = char_tokenizer()
    model, _ = build_model("tiny", tok, seed=0)
    model.save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    base = M.load_weights(tmp / "base")
    g = torch.Generator().manual_seed(1)
    for i, name in enumerate(("a", "b")):
        w = {n: t.clone() for n, t in base.items()}
        for t in w.values():
            t.view(-1)[i::2] += 0.02 * torch.randn(t.view(-1)[i::2].shape, generator=g)
        M.save_like(tmp / "base", w, tmp / name)
        assert main(["merge", "extract", "--base", str(tmp / "base"), "--tuned", str(tmp / name),
                     "--out", str(tmp / f"{name}.spd"), "--task", name]) == 0
    return tmp, base


def test_delta_file_round_trip_restores_the_fine_tune(ckpts):
    tmp, base = ckpts
    deltas, manifest = M.load_delta(tmp / "a.spd", base)
    assert manifest["dtype"] == "float32" and manifest["task"] == "a" and abs(manifest["density"] - 0.5) < 0.01
    restored = M.compose(base, [deltas])
    tuned = M.load_weights(tmp / "a")
    for n in base:
        torch.testing.assert_close(restored[n], tuned[n], rtol=0, atol=1e-7)  # base + (tuned - base): fp32 rounding only
    assert (tmp / "a.spd").stat().st_size < 0.6 * 5 * sum(t.numel() for t in base.values())  # < dense fp32 + int32 index


def test_disjoint_deltas_sum_equals_applying_both_and_mergekit_ties_agrees(ckpts):
    tmp, base = ckpts
    a, b = M.load_delta(tmp / "a.spd", base)[0], M.load_delta(tmp / "b.spd", base)[0]
    assert M.support_stats(a, b)["overlap"] == 0
    both = M.compose(M.compose(base, [a]), [b])
    assert main(["merge", "apply", "--base", str(tmp / "base"), "--deltas", str(tmp / "a.spd"), str(tmp / "b.spd"),
                 "--method", "sum", "--out", str(tmp / "sum")]) == 0
    summed = M.load_weights(tmp / "sum")
    ta, tb = M.load_weights(tmp / "a"), M.load_weights(tmp / "b")
    for n in base:
        assert torch.equal(summed[n], both[n])
        # every entry is the one fine-tune that touched it
        torch.testing.assert_close(summed[n].view(-1)[0::2], ta[n].view(-1)[0::2], rtol=0, atol=1e-7)
        torch.testing.assert_close(summed[n].view(-1)[1::2], tb[n].view(-1)[1::2], rtol=0, atol=1e-7)
    # TIES (mergekit) at density 1.0 on disjoint supports: no sign conflict, one contributor per entry -> the sum
    assert main(["merge", "apply", "--base", str(tmp / "base"), "--deltas", str(tmp / "a.spd"), str(tmp / "b.spd"),
                 "--method", "ties", "--density", "1.0", "--out", str(tmp / "ties")]) == 0
    ties = M.load_weights(tmp / "ties")
    for n in base:
        torch.testing.assert_close(ties[n], summed[n], rtol=0, atol=1e-6)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp / "ties", local_files_only=True)  # a loadable checkpoint


def test_task_arithmetic_weights_scale_each_delta(ckpts):
    tmp, base = ckpts
    a, b = M.load_delta(tmp / "a.spd", base)[0], M.load_delta(tmp / "b.spd", base)[0]
    out = M.compose(base, [a, b], weights=[0.5, 2.0], scale=0.5)
    n = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(out[n] - base[n], 0.25 * a[n].to_dense() + 1.0 * b[n].to_dense(), rtol=0, atol=1e-7)


def test_bad_delta_files_are_refused_with_a_clear_error(ckpts, tmp_path):
    tmp, base = ckpts
    raw = (tmp / "a.spd").read_bytes()
    (tmp_path / "trunc.spd").write_bytes(raw[:-10])
    (tmp_path / "flip.spd").write_bytes(raw[:-10] + bytes([raw[-10] ^ 1]) + raw[-9:])
    (tmp_path / "magic.spd").write_bytes(b"XXXX" + raw[4:])
    for f, words in [("trunc.spd", "truncated"), ("flip.spd", "hash mismatch"), ("magic.spd", "bad magic")]:
        with pytest.raises(M.DeltaFileError, match=words):
            M.load_delta(tmp_path / f, base)
    other = {n: t.clone() for n, t in base.items()}
    other["transformer.wpe.weight"][0, 0] += 1.0
    with pytest.raises(M.DeltaFileError, match="made against base"):
        M.load_delta(tmp / "a.spd", other)
    half = {n: t.to(torch.bfloat16) for n, t in base.items()}
    with pytest.raises(M.DeltaFileError, match="base"):  # fingerprint covers dtype; the dtype check names it too
        M.load_delta(tmp / "a.spd", half)
    M.save_like(tmp / "base", other, tmp_path / "other")
    assert main(["merge", "apply", "--base", str(tmp_path / "other"), "--deltas", str(tmp / "a.spd"),
                 "--out", str(tmp_path / "x")]) == 2  # the CLI refuses with exit code 2, writes nothing
    assert not (tmp_path / "x").exists()


def test_dtype_mismatch_is_named(ckpts, tmp_path):
    """A delta recorded against a bf16 base refused on the fp32 base of the same weights: the dtype is named."""
    tmp, base = ckpts
    half = {n: t.to(torch.bfloat16) for n, t in base.items()}
    tuned = {n: t.clone() for n, t in half.items()}
    tuned["transformer.wpe.weight"][0, :4] += 1.0
    M.save_delta(tmp_path / "h.spd", M.extract(half, tuned), half)
    manifest, _ = M.read_manifest(tmp_path / "h.spd")
    assert manifest["dtype"] == "bfloat16"
    # same fingerprint check would fire first on the fp32 base; forge a manifest whose fingerprint matches
    raw = (tmp_path / "h.spd").read_bytes()
    forged = raw.replace(manifest["base_fingerprint"].encode(), M.fingerprint(base).encode())
    (tmp_path / "f.spd").write_bytes(forged)
    with pytest.raises(M.DeltaFileError, match="dtype bfloat16 but the base is float32"):
        M.load_delta(tmp_path / "f.spd", base)
