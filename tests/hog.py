"""A consumer-group member that keeps every partition from the others while a flag file exists.

Usage: hog.py BROKERS TOPIC GROUP FLAG_FILE READY_FILE STOP_FILE

It joins GROUP first, so it leads the group and computes every assignment; its assignor calls
itself "range", the protocol librdkafka members offer too. While FLAG_FILE exists it assigns
every partition to itself (and never reads them); once FLAG_FILE is gone, the next rebalance
hands every partition to the other members. Written with kafka-python, a Kafka protocol
implementation independent of librdkafka. READY_FILE is written once it holds the partitions;
it leaves when STOP_FILE appears.
"""

import os
import sys
import time

from kafka import KafkaConsumer
from kafka.coordinator.assignors.range import RangePartitionAssignor

brokers, topic, group, flag, ready, stop = sys.argv[1:7]
ME = "mediaflow-test-hog"


class HogAssignor(RangePartitionAssignor):
    name = "range"

    @classmethod
    def assign(cls, cluster, members):
        fair = RangePartitionAssignor.assign(cluster, members)
        hog = os.path.exists(flag)
        others = [m.member_id for m in members if m.group_instance_id != ME]
        takers = [m.member_id for m in members if m.group_instance_id == ME] if hog else others
        if not takers:
            return fair
        everything = sorted(
            (t, sorted(cluster.partitions_for_topic(t) or []))
            for m in members
            for t in m.metadata.topics
        )
        everything = sorted(dict(everything).items())
        out = {}
        for member_id, assignment in fair.items():
            mine = everything if member_id == takers[0] else []
            assignment.assigned_partitions = mine
            out[member_id] = assignment
        print(f"hog: assigned everything to {'me' if hog else 'the others'}", flush=True)
        return out


consumer = KafkaConsumer(
    topic,
    bootstrap_servers=brokers,
    group_id=group,
    group_instance_id=ME,
    enable_auto_commit=False,
    auto_offset_reset="earliest",
    partition_assignment_strategy=[HogAssignor],
    session_timeout_ms=10000,
    heartbeat_interval_ms=500,
    max_poll_records=1,
)
announced = False
while not os.path.exists(stop):
    # Polled only to stay in the group: what it takes is never committed, and while it holds
    # the partitions nobody else gets them.
    consumer.poll(timeout_ms=100)
    if consumer.assignment():
        consumer.pause(*consumer.assignment())
        if not announced:
            with open(ready, "w") as f:
                f.write(",".join(f"{tp.topic}/{tp.partition}" for tp in consumer.assignment()))
            announced = True
consumer.close()
