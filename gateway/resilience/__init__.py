"""Building blocks the resilience layers share: backoff schedules, retry budgets, windows."""
