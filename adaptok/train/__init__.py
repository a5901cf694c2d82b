"""Training the adaptive models: schedules today (:func:`keep_rate_schedule`);
the training loop, data and evaluation land here with the lab."""
from .schedules import keep_rate_schedule

__all__ = ["keep_rate_schedule"]
