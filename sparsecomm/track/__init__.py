"""Measurement: update sparsity by definition, hot parameters, rank, communication; sinks."""
from .comm import CommTracker, ring_allreduce_bytes
from .hot import HotParameterMap
from .layers import KINDS, kind_of, named_parameter_kinds
from .rank import RankTracker, entropy_rank, random_baseline, stable_rank, stacked_rank
from .sinks import ConsoleSink, JsonlSink, PrometheusSink, Recorder, TensorBoardSink, WandbSink, read_jsonl
from .sparsity import DEFINITIONS, SparsityTracker
from .stats import StepStats

__all__ = ["CommTracker", "ring_allreduce_bytes", "HotParameterMap", "KINDS", "kind_of", "named_parameter_kinds",
           "RankTracker", "entropy_rank", "random_baseline", "stable_rank", "stacked_rank", "ConsoleSink", "JsonlSink",
           "PrometheusSink", "Recorder", "TensorBoardSink", "WandbSink", "read_jsonl", "DEFINITIONS",
           "SparsityTracker", "StepStats"]
