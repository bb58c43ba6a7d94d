"""Writes a zip archive with Python's own zipfile: how the archives users upload are made by
tools other than ours.

usage: make_zip.py OUT SPEC.json

SPEC is a list of entries, each {"name": path in the archive, and one of
  "file": a file's path (its bytes), "text": a string, "zeros": a count of zero bytes,
  "dir": true (a directory entry), "symlink": a link's target;
  optionally "stored": true (no compression, else deflated) and "corrupt": true (one byte of
  the entry's stored data flipped after writing, so that its CRC no longer matches)}.
"""

import json
import sys
import zipfile


def main() -> int:
    out, spec_path = sys.argv[1:3]
    with open(spec_path) as f:
        spec = json.load(f)
    corrupt = []
    with zipfile.ZipFile(out, "w") as zf:
        for entry in spec:
            name = entry["name"]
            if entry.get("dir"):
                zf.writestr(zipfile.ZipInfo(name.rstrip("/") + "/"), b"")
                continue
            info = zipfile.ZipInfo(name, date_time=(2026, 12, 7, 12, 0, 0))
            info.compress_type = zipfile.ZIP_STORED if entry.get("stored") else zipfile.ZIP_DEFLATED
            if "symlink" in entry:
                info.create_system = 3  # Unix, whose mode bits say "link"
                info.external_attr = 0o120777 << 16
                data = entry["symlink"].encode()
            elif "file" in entry:
                with open(entry["file"], "rb") as f:
                    data = f.read()
            elif "zeros" in entry:
                data = bytes(entry["zeros"])
            else:
                data = entry["text"].encode()
            info.file_size = len(data)
            zf.writestr(info, data)
            if entry.get("corrupt"):
                corrupt.append(name)
        offsets = {name: zf.getinfo(name).header_offset for name in corrupt}
    with open(out, "r+b") as f:
        for name, offset in offsets.items():
            # The local header: 30 bytes, then the name and extra field, then the data.
            f.seek(offset + 26)
            header = f.read(4)
            name_len = int.from_bytes(header[:2], "little")
            extra_len = int.from_bytes(header[2:], "little")
            at = offset + 30 + name_len + extra_len + 64
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
