"""Selection (which entries to send) and error feedback (keep what was not sent)."""
from .feedback import ErrorFeedback, add_stochastic_, subtract_sent_
from .select import (SELECTORS, ChunkedTopK, RandomK, SampledThreshold, Selector, ThresholdReuse, TopK, k_for,
                     load_selector_state, make_selector, selector_state)

__all__ = ["ErrorFeedback", "add_stochastic_", "subtract_sent_", "SELECTORS", "ChunkedTopK", "RandomK", "SampledThreshold", "Selector", "ThresholdReuse", "TopK",
           "k_for", "load_selector_state", "make_selector", "selector_state"]
