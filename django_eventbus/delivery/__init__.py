"""Delivery: the log and the bus reach consumers, exactly once per consumer.

``runtime`` runs the process's bus; ``consumers`` is the registry of handlers;
``listener`` runs them (live from the bus, catch-up from the log) under ``leases``
(one owner per consumer); ``relay`` publishes log rows no writer published;
``streams`` relays the whole log to a stream engine.
"""
