"""Finds faces and licence plates with OpenCV's own Python binding (PyPI
opencv-python-headless) and its own copies of the Haar cascades, following the redact stage's
documented recipe: grey, images larger than MAX_SIDE searched at that size, histogram equalised,
detectMultiScale(scaleFactor=1.1, minNeighbors=5, minSize=30x30).

usage: opencv_detect.py MAX_SIDE IMAGE...
Prints {image: [{"label", "x", "y", "width", "height"}, ...]} as JSON.
"""

import json
import sys

import cv2

CASCADES = {
    "face": "haarcascade_frontalface_default.xml",
    "plate": "haarcascade_russian_plate_number.xml",
}


def main() -> int:
    max_side = int(sys.argv[1])
    classifiers = {
        label: cv2.CascadeClassifier(cv2.data.haarcascades + name)
        for label, name in CASCADES.items()
    }
    found = {}
    for path in sys.argv[2:]:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            print(f"cannot read {path}", file=sys.stderr)
            return 1
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        height, width = grey.shape
        scale = 1.0
        if max(width, height) > max_side:
            scale = max(width, height) / max_side
            size = (max(1, int(width / scale + 0.5)), max(1, int(height / scale + 0.5)))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        grey = cv2.equalizeHist(grey)
        boxes = []
        for label, classifier in classifiers.items():
            for x, y, w, h in classifier.detectMultiScale(
                grey, scaleFactor=1.1, minNeighbors=5, minSize=(30, 30)
            ):
                boxes.append(
                    {
                        "label": label,
                        "x": int(x * scale + 0.5),
                        "y": int(y * scale + 0.5),
                        "width": int(w * scale + 0.5),
                        "height": int(h * scale + 0.5),
                    }
                )
        found[path] = boxes
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
