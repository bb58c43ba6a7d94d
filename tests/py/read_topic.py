"""Reads CloudEvents from a Kafka topic with kafka-python, an independent implementation of the
Kafka protocol, and prints one JSON object per message: the ce_* headers and the JSON payload.

usage: read_topic.py BOOTSTRAP TOPIC COUNT TIMEOUT_SECONDS
Exits 0 after COUNT messages, 1 if fewer arrived before the timeout.
"""

import json
import sys
import time

from kafka import KafkaConsumer


def main() -> int:
    bootstrap, topic, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
        request_timeout_ms=30000,
    )
    seen = 0
    deadline = time.monotonic() + timeout
    while seen < count and time.monotonic() < deadline:
        for msg in consumer:
            headers = {k: v.decode("utf-8") for k, v in (msg.headers or [])}
            print(
                json.dumps(
                    {
                        "partition": msg.partition,
                        "offset": msg.offset,
                        "key": msg.key.decode("utf-8") if msg.key else None,
                        "headers": headers,
                        "data": json.loads(msg.value),
                    }
                ),
                flush=True,
            )
            seen += 1
            if seen >= count:
                break
    consumer.close()
    if seen < count:
        print(f"only {seen} of {count} messages arrived within {timeout}s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
