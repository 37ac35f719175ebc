"""Selection (which entries to send) and error feedback (keep what was not sent)."""
from .feedback import ErrorFeedback
from .select import (SELECTORS, ChunkedTopK, RandomK, SampledThreshold, Selector, ThresholdReuse, TopK, k_for,
                     make_selector)

__all__ = ["ErrorFeedback", "SELECTORS", "ChunkedTopK", "RandomK", "SampledThreshold", "Selector", "ThresholdReuse", "TopK",
           "k_for", "make_selector"]
