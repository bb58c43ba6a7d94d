"""Prints imagehash's DCT perceptual hash (imagehash.phash) of each image path given, one per
line as 16 hex digits: the independent implementation mediaflow's phash is checked against."""

import sys

import imagehash
from PIL import Image

for path in sys.argv[1:]:
    print(imagehash.phash(Image.open(path)))
