"""Coordinator parts without sockets: chunked transfer, the CLI derived from CoordinatorConfig,
the journal's torn-tail handling."""
import argparse
import dataclasses

import numpy as np
import pytest
import torch

from sparsecomm.exchange import chunks
from sparsecomm.exchange.coordinator import CoordinatorConfig, add_arguments, config_from_args
from sparsecomm.exchange.coordinator.checkpoint import JOURNAL_FILE, Journal, read_journal
from sparsecomm.exchange.coordinator.state import Aggregate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_reassemble_in_any_order(dtype):
    src = torch.randn(1000).to(dtype)
    out = torch.empty_like(src)
    asm = chunks.Assembler(chunks.raw_bytes(out), chunk_bytes=300)
    parts = list(chunks.split(chunks.raw_bytes(src), chunk_bytes=300))
    assert len(parts) == -(-src.numel() * src.element_size() // 300)
    done = [asm.add(**where, chunk=c) for where, c in reversed(parts)]
    assert done == [False] * (len(parts) - 1) + [True]
    assert torch.equal(out.view(torch.int16) if dtype == torch.bfloat16 else out,
                       src.view(torch.int16) if dtype == torch.bfloat16 else src)


def test_chunks_that_repeat_overlap_or_lie_are_refused():
    out = np.zeros(1000, dtype=np.uint8)
    asm = chunks.Assembler(out, chunk_bytes=400)  # chunks at 0, 400, 800 (the last 200 bytes)
    asm.add(0, 3, 0, bytes(400))
    for index, total, offset, n in [(0, 3, 0, 400),   # repeated
                                    (1, 3, 200, 400),  # overlaps chunk 0
                                    (1, 4, 400, 400),  # total changed
                                    (2, 3, 800, 400),  # runs past the end
                                    (1, 3, 400, 100)]:  # short but not the last: would leave a hole
        with pytest.raises(chunks.ChunkError):
            asm.add(index, total, offset, bytes(n))


def test_the_cli_is_derived_from_the_config():
    p = argparse.ArgumentParser()
    add_arguments(p)
    flags = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(CoordinatorConfig):
        assert f.name in flags and f.metadata.get("help"), f.name  # every field: a flag and its help
    assert config_from_args(p.parse_args([])) == CoordinatorConfig()
    cfg = config_from_args(p.parse_args(["--deadline-s", "2.5", "--no-rollout-bf16", "--late", "drop", "--insecure",
                                         "--bind", "tcp://0.0.0.0:1", "--metrics-port", "9"]))
    assert (cfg.deadline_s, cfg.rollout_bf16, cfg.late, cfg.insecure, cfg.metrics_port) == (2.5, False, "drop", True, 9)
    with pytest.raises(SystemExit):
        p.parse_args(["--late", "keep"])  # choices come from the field too


def test_a_torn_journal_record_is_discarded_and_later_records_follow_valid_ones(tmp_path):
    a1 = Aggregate(1, 0, "00" * 32, "11" * 32, b"payload-1", ("t0", "t1"), (("t2", 0),))
    a2 = Aggregate(2, 1, "11" * 32, "22" * 32, b"payload-2", ("t0",))
    j = Journal(tmp_path, fsync=False)
    j.append(a1)
    j.append(a2, mean=b"m", selector=b"s")
    j.close()
    path = tmp_path / JOURNAL_FILE
    path.write_bytes(path.read_bytes()[:-3])  # a crash in the middle of the second append
    assert [r["aggregate"] for r in read_journal(tmp_path)] == [a1]
    j = Journal(tmp_path, fsync=False)  # reopening cuts the torn tail, so this record is readable
    j.append(a2)
    j.close()
    assert [r["aggregate"] for r in read_journal(tmp_path)] == [a1, a2]
    j = Journal(tmp_path, fsync=False)
    j.reset()  # after a checkpoint
    j.close()
    assert list(read_journal(tmp_path)) == []
