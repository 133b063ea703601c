"""
Feeds: MQTT and Kafka into the durable log.

Each feed takes raw payloads from its broker, hands them to a :class:`FeedSink`
(decode, dead-letter what is bad, append the rest with the feed's positions in one
transaction) and acknowledges to the broker only after the sink says the events are
durable. ``daemon.feeds.mqtt`` and ``daemon.feeds.kafka`` hold the two feeds.
"""

from daemon.feeds.sink import Backoff, FeedSink, read_secret

__all__ = ["Backoff", "FeedSink", "read_secret"]
