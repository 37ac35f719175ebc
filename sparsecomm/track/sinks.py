"""Sinks: where StepStats go. Each has `write(stats)` and `close()`; `Recorder` fans out.

- JsonlSink        one JSON object per line (the source of truth for `sparsecomm report`)
- PrometheusSink   a prometheus-client HTTP endpoint per process, explicit registry, names
                   `sparsecomm_*` in base units, labels rank/run (+ definition, layer_kind, phase)
- ConsoleSink      one progress line every N steps
- TensorBoardSink  when `torch.utils.tensorboard` (tensorboard) is installed
- WandbSink        when `wandb` is installed; offline mode unless the user configured otherwise

Prometheus families (counters for bytes, histograms for phase seconds, gauges for the rest):

    sparsecomm_sent_bytes_total{rank,run}              counter  comm/sent_bytes
    sparsecomm_received_bytes_total{rank,run}          counter  comm/recv_bytes
    sparsecomm_dense_equivalent_bytes_total{rank,run}  counter  comm/dense_equiv_bytes
    sparsecomm_phase_seconds{rank,run,phase}           histogram timing/<phase>_s
    sparsecomm_update_sparsity_ratio{rank,run,definition,layer_kind}  gauge sparsity/<def>/global|kind/<k>
    sparsecomm_update_sparsity_k_steps_ratio{...,definition,k_steps}  gauge sparsity_k<K>/<def>/global
    sparsecomm_exchange_path{rank,run,path}            counter  exchanges taken per path
    sparsecomm_step{rank,run}                          gauge    last step recorded
    sparsecomm_reward / sparsecomm_loss{rank,run}      gauge    train/reward, train/loss
    sparsecomm_density_ratio{rank,run}                 gauge    comm/density
    sparsecomm_memory_bytes{rank,run,buffer}           gauge    memory/<buffer>_bytes (ASPG's state, CUDA peak)
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Protocol, TextIO

from .stats import StepStats


class Sink(Protocol):
    def write(self, stats: StepStats) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line. mode "w" starts the file afresh (a new run), "a" appends (a resume)."""

    def __init__(self, path: str | Path, mode: str = "w"):
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' or 'a', got {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open(mode, buffering=1)  # line-buffered: a crash loses at most a line

    def write(self, stats: StepStats) -> None:
        self._f.write(json.dumps(stats.to_dict(), allow_nan=True) + "\n")

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | Path) -> list[StepStats]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(StepStats.from_dict(json.loads(line)))
    return out


PHASE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class PrometheusSink:
    """Exports StepStats on an HTTP endpoint (`port=None`: registry only, e.g. for tests)."""

    def __init__(self, port: int | None = 0, addr: str = "127.0.0.1", registry=None, rank: int = 0, run: str = ""):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = registry if registry is not None else CollectorRegistry()
        self.labels = {"rank": str(rank), "run": run}
        base = ["rank", "run"]
        r = self.registry
        self.sent = Counter("sparsecomm_sent_bytes", "Encoded bytes sent, headers included", base, registry=r)
        self.recv = Counter("sparsecomm_received_bytes", "Encoded bytes received", base, registry=r)
        self.dense = Counter("sparsecomm_dense_equivalent_bytes",
                             "Bytes a ring all-reduce of the same tensors would send per worker", base, registry=r)
        self.phase = Histogram("sparsecomm_phase_seconds", "Time per pipeline phase", base + ["phase"],
                               buckets=PHASE_BUCKETS_S, registry=r)
        self.sparsity = Gauge("sparsecomm_update_sparsity_ratio", "Fraction of entries unchanged by the last step",
                              base + ["definition", "layer_kind"], registry=r)
        self.sparsity_k = Gauge("sparsecomm_update_sparsity_k_steps_ratio",
                                "Fraction of entries unchanged between weights K steps apart",
                                base + ["definition", "k_steps"], registry=r)
        self.path = Counter("sparsecomm_exchange_path", "Exchanges per path taken", base + ["path"], registry=r)
        self.step = Gauge("sparsecomm_step", "Last step recorded", base, registry=r)
        self.reward = Gauge("sparsecomm_reward", "Mean reward of the last step", base, registry=r)
        self.loss = Gauge("sparsecomm_loss", "Loss of the last step", base, registry=r)
        self.density = Gauge("sparsecomm_density_ratio", "Fraction of entries sent in the last exchange", base, registry=r)
        self.memory = Gauge("sparsecomm_memory_bytes", "Bytes held per buffer (optimizer state; CUDA peak)",
                            base + ["buffer"], registry=r)
        self.server = None
        self.port = None
        if port is not None:
            self.server, _thread = start_http_server(port, addr=addr, registry=self.registry)
            self.port = self.server.server_port

    def write(self, s: StepStats) -> None:
        lab = self.labels
        m = s.metrics
        self.step.labels(**lab).set(s.step)
        for key, counter in (("comm/sent_bytes", self.sent), ("comm/recv_bytes", self.recv),
                             ("comm/dense_equiv_bytes", self.dense)):
            if isinstance(m.get(key), (int, float)):
                counter.labels(**lab).inc(m[key])
        for key, gauge in (("train/reward", self.reward), ("train/loss", self.loss), ("comm/density", self.density)):
            if isinstance(m.get(key), (int, float)) and math.isfinite(m[key]):
                gauge.labels(**lab).set(m[key])
        if isinstance(m.get("comm/path"), str):
            self.path.labels(**lab, path=m["comm/path"]).inc()
        for key, v in m.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            parts = key.split("/")
            if parts[0] == "timing" and key.endswith("_s"):
                self.phase.labels(**lab, phase=key[len("timing/"):-2]).observe(v)
            elif parts[0] == "sparsity" and len(parts) == 3 and parts[2] == "global":
                self.sparsity.labels(**lab, definition=parts[1], layer_kind="all").set(v)
            elif parts[0] == "sparsity" and len(parts) == 4 and parts[2] == "kind":
                self.sparsity.labels(**lab, definition=parts[1], layer_kind=parts[3]).set(v)
            elif parts[0] == "memory" and len(parts) == 2 and parts[1].endswith("_bytes"):
                self.memory.labels(**lab, buffer=parts[1][:-len("_bytes")]).set(v)
            elif parts[0].startswith("sparsity_k") and len(parts) == 3 and parts[2] == "global":
                self.sparsity_k.labels(**lab, definition=parts[1], k_steps=parts[0][len("sparsity_k"):]).set(v)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class ConsoleSink:
    """A progress line every `every` steps with the numbers people look at first."""

    def __init__(self, every: int = 1, stream: TextIO | None = None):
        self.every, self.stream = max(1, every), stream or sys.stdout

    def write(self, s: StepStats) -> None:
        if s.step % self.every:
            return
        m = s.metrics
        parts = [f"step {s.step:5d}"]
        for key, fmt in (("train/reward", "reward {:.3f}"), ("train/loss", "loss {:.4f}"),
                         ("sparsity/fp32_exact/global", "sparsity fp32 {:.2%}"),
                         ("sparsity/bf16_view/global", "bf16 {:.2%}"), ("comm/sent_bytes", "sent {:,.0f} B"),
                         ("comm/dense_equiv_bytes", "dense {:,.0f} B"), ("comm/path", "path {}"),
                         ("timing/exchange_s", "exchange {:.3f}s"), ("timing/dense_allreduce_s", "dense all-reduce {:.3f}s")):
            if key in m:
                parts.append(fmt.format(m[key]))
        if s.world_size > 1:
            parts.insert(1, f"rank {s.rank}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        pass


class TensorBoardSink:
    def __init__(self, logdir: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self.writer = SummaryWriter(str(logdir))

    def write(self, s: StepStats) -> None:
        for k, v in s.metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, s.step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, project: str = "sparsecomm", run_dir: str | Path | None = None, mode: str = "offline", **kw):
        import wandb

        self.run = wandb.init(project=project, dir=str(run_dir) if run_dir else None, mode=mode, **kw)

    def write(self, s: StepStats) -> None:
        self.run.log({k: v for k, v in s.metrics.items() if isinstance(v, (int, float))}, step=s.step)

    def close(self) -> None:
        self.run.finish()


class Recorder:
    """Fans one StepStats out to every sink; closes them all, even if one fails."""

    def __init__(self, sinks: list[Sink] | None = None):
        self.sinks = list(sinks or [])

    def record(self, stats: StepStats) -> None:
        for sink in self.sinks:
            sink.write(stats)

    def close(self) -> None:
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # keep closing the others
                errors.append(e)
        if errors:
            raise errors[0]
