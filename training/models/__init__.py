"""Backbone architecture only: no losses, no parallelism, no devices."""
