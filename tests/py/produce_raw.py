"""Produces one message with kafka-python, with arbitrary headers and value: how a foreign or
buggy producer puts malformed events on a topic.

usage: produce_raw.py BOOTSTRAP TOPIC KEY VALUE [HEADER=VALUE ...]
"""

import sys

from kafka import KafkaProducer


def main() -> int:
    bootstrap, topic, key, value = sys.argv[1:5]
    headers = [(h.split("=", 1)[0], h.split("=", 1)[1].encode()) for h in sys.argv[5:]]
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    producer.send(topic, key=key.encode(), value=value.encode(), headers=headers).get(timeout=30)
    producer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
