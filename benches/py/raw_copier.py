"""The peer of the copier benchmark: a raw consume -> produce loop in confluent-kafka (librdkafka),
at least once, as one would write it by hand: consume a batch, produce each message unchanged
(key, value, headers) to the output topic, flush, then commit the batch's offsets.

usage: raw_copier.py BOOTSTRAP INPUT OUTPUT COUNT
Exits 0 once COUNT messages are copied and committed.
"""

import sys

from confluent_kafka import Consumer, Producer


def main() -> int:
    bootstrap, source, sink, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-raw",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    # The same delivery settings as mediaflow's publisher: acknowledged by every in-sync
    # replica, a short linger.
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    consumer.subscribe([source])
    copied = 0
    while copied < count:
        batch = consumer.consume(num_messages=500, timeout=1.0)
        for msg in batch:
            if msg.error():
                raise SystemExit(f"consume: {msg.error()}")
            producer.produce(sink, value=msg.value(), key=msg.key(), headers=msg.headers())
        if batch:
            if producer.flush(30) != 0:
                raise SystemExit("flush: messages left undelivered")
            consumer.commit(asynchronous=False)
            copied += len(batch)
    consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
