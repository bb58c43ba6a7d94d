"""Computes what the tagging pipeline's reducers must report for a batch, on its own: reads the
raw per-item events (PREFIX + images.redacted and PREFIX + tagging.tagged) with kafka-python, an
independent Kafka client, from the beginning, until it has both events of every MEDIA_ID (an event
read twice counts once), and prints counts, sums and histograms as JSON.

usage: batch_aggregates.py BOOTSTRAP PREFIX TIMEOUT_SECONDS MEDIA_ID...
"""

import json
import sys
import time
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal

from kafka import KafkaConsumer

SIZE_BOUNDS = [100000, 1000000, 4000000, 16000000]
SHARPNESS_BOUNDS = [Decimal(b) for b in ("10", "50", "100", "500", "1000", "5000")]
SHARPNESS_SCALE = Decimal("0.001")


def bucket(value, bounds):
    """Bucket 0 below the first bound, i for [bounds[i-1], bounds[i]), the last at or above."""
    return sum(1 for b in bounds if b <= value)


def main() -> int:
    bootstrap, prefix, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    media = set(sys.argv[4:])
    redacted_topic, tagged_topic = prefix + "images.redacted", prefix + "tagging.tagged"
    consumer = KafkaConsumer(
        redacted_topic,
        tagged_topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
        request_timeout_ms=30000,
    )
    redacted, tagged = {}, {}
    deadline = time.monotonic() + timeout
    while (set(redacted) != media or set(tagged) != media) and time.monotonic() < deadline:
        for msg in consumer:
            data = json.loads(msg.value, parse_float=Decimal)
            if data.get("media_id") not in media:
                continue
            (redacted if msg.topic == redacted_topic else tagged)[data["media_id"]] = data
            if set(redacted) == media and set(tagged) == media:
                break
    if set(redacted) != media or set(tagged) != media:
        print(
            f"missing: redacted {sorted(media - set(redacted))}, tagged {sorted(media - set(tagged))}",
            file=sys.stderr,
        )
        return 1

    objects, colors = Counter(), Counter()
    size_sum = pixel_sum = 0
    sizes = [0] * (len(SIZE_BOUNDS) + 1)
    sharpness = [0] * (len(SHARPNESS_BOUNDS) + 1)
    for m in sorted(media):
        r, t = redacted[m], tagged[m]
        for label, n in r["objects"].items():
            objects[label] += n
        for colour in t["tags"]["colours"]:
            colors[colour["name"]] += 1
        size_sum += r["input"]["size"]
        pixel_sum += r["pixels"]
        sizes[bucket(r["pixels"], SIZE_BOUNDS)] += 1
        sharp = Decimal(t["tags"]["sharpness"]).quantize(SHARPNESS_SCALE, rounding=ROUND_HALF_UP)
        sharpness[bucket(sharp, SHARPNESS_BOUNDS)] += 1
    print(
        json.dumps(
            {
                "objects": dict(objects),
                "colors": dict(colors),
                "bytes": {"sum": size_sum, "count": len(media)},
                "pixels": {"sum": pixel_sum, "count": len(media)},
                "sizes": sizes,
                "sharpness": sharpness,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
