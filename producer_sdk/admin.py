"""Create the contract's topics on any Kafka cluster, with their cleanup and retention.

Owns topic administration. Must never delete or reconfigure an existing topic: it reports
what exists and leaves operators to change it on purpose.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from i2v_fleet.schemas import TopicSpec

from .errors import BrokerError, TopicsError
from .settings import KafkaSettings

_TOPIC_ALREADY_EXISTS = 36


class TopicOutcome(str, enum.Enum):
    CREATED = "created"
    EXISTS = "exists"


async def create_topics(
    kafka: KafkaSettings,
    specs: Sequence[TopicSpec],
    *,
    replication_factor: int | None = None,
    extra_config: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> dict[str, TopicOutcome]:
    """Create each topic that does not exist yet; return what happened to each.

    `replication_factor=None` takes min(3, brokers in the cluster); with 3 replicas, set
    `min.insync.replicas=2` (broker default or `extra_config`) so `acks=all` survives the
    loss of a broker.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(**kafka.client_kwargs(), request_timeout_ms=int(timeout_s * 1000))
    try:
        await admin.start()
    except KafkaError as exc:
        await admin.close()
        raise BrokerError(
            f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}; "
            "check KAFKA_BOOTSTRAP_SERVERS (or run `i2v dev up` for a local stack)"
        ) from None
    try:
        if replication_factor is None:
            cluster = await admin.describe_cluster()
            replication_factor = max(1, min(3, len(cluster.get("brokers", []))))
        new = [
            NewTopic(
                spec.name,
                spec.partitions,
                replication_factor,
                topic_configs={**spec.config, **(extra_config or {})},
            )
            for spec in specs
        ]
        response = await admin.create_topics(new, timeout_ms=int(timeout_s * 1000))
        outcomes: dict[str, TopicOutcome] = {}
        problems: list[str] = []
        for topic, code, message in response.topic_errors:
            if code == 0:
                outcomes[topic] = TopicOutcome.CREATED
            elif code == _TOPIC_ALREADY_EXISTS:
                outcomes[topic] = TopicOutcome.EXISTS
            else:
                problems.append(f"{topic}: error {code} ({message or 'no message'})")
        if problems:
            raise TopicsError("could not create topics: " + "; ".join(problems))
        return outcomes
    except KafkaError as exc:
        raise TopicsError(f"could not create topics: {exc}") from None
    finally:
        await admin.close()


async def list_topics(kafka: KafkaSettings, timeout_s: float = 10.0) -> list[str]:
    """Names of the topics on the cluster."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(**kafka.client_kwargs(), request_timeout_ms=int(timeout_s * 1000))
    try:
        await admin.start()
        return sorted(await admin.list_topics())
    except KafkaError as exc:
        raise BrokerError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}") from None
    finally:
        await admin.close()
