"""A strict index of webdataset tar shards: samples grouped exactly as webdataset groups them, and a damaged or cut
shard an error naming the shard and the byte offset, never a silently shorter split.

Python's `tarfile` ends its iteration quietly at a header it cannot parse (a bad checksum, a cut file) once the
first member is read: `TarFile.next` breaks on `InvalidHeaderError`, `EmptyHeaderError` and `TruncatedHeaderError`
unless the offset is 0. So after the iteration the index checks what tarfile stopped on: everything from the end
of the last member to the end of the file must be the end-of-archive blocks (at least two zero blocks of 512
bytes, and nothing but zeros: tar pads to its record size), and the members must fit inside the file.

Grouping follows webdataset 1.0's `tariterators` (`tar_file_iterator` and `group_by_keys`): only regular members;
names matching `__[^/]*__($|/)` (metadata) skipped; key and extension split by `base_plus_ext`; extensions
lower-cased; a member whose key differs from the previous member's starts a new sample (so a key seen again later
is a new sample, as webdataset yields it); an extension repeated within one sample is refused, as webdataset
raises "duplicate file name in tar file".

Brace patterns (`train-{000000..000099}.tar`) are counted before they are expanded (`count_names`), so a pattern
of 10^12 names is refused at once instead of filling memory.
"""

from __future__ import annotations

import itertools
import os
import re
import tarfile
from pathlib import Path

from vlmcache.errors import VlmcacheError

BLOCK = 512
MAX_MEMBER_BYTES = 64 << 20  # an image member larger than this is a skipped row, never read whole
MAX_SHARDS = 100_000  # names one brace pattern may expand to
MAX_LABEL_BYTES = 64  # a label member is a small integer as text
META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")
NO_IMAGE = -1  # the offset of a sample without an image member: extraction skips it with the reason
TOO_LARGE = -2  # the offset of a sample whose image member is over MAX_MEMBER_BYTES


# --------------------------------------------------------------------------- brace patterns

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
_ALPHA = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?$")


def _groups(text: str) -> list[tuple[str, str]]:
    """text split into ('lit', s) and ('brace', inside) parts at depth 0 (backslash escapes kept literal)."""
    parts, i, depth, start, lit = [], 0, 0, 0, []
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            if depth == 0:
                lit.append(text[i : i + 2])
            i += 2
            continue
        if c == "{":
            if depth == 0:
                start = i
            depth += 1
        elif c == "}" and depth:
            depth -= 1
            if depth == 0:
                parts.append(("lit", "".join(lit)))
                lit = []
                parts.append(("brace", text[start + 1 : i]))
        elif depth == 0:
            lit.append(c)
        i += 1
    if depth:  # an unclosed brace is literal in braceexpand, and what follows it is parsed again
        parts.append(("lit", "".join(lit) + "{"))
        return parts + _groups(text[start + 1 :])
    parts.append(("lit", "".join(lit)))
    return parts


def _split_commas(text: str) -> list[str]:
    out, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        depth += c == "{"
        depth -= c == "}" and depth > 0
        if c == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
        i += 1
    out.append(text[start:])
    return out


def count_names(pattern: str) -> int:
    """How many names `braceexpand` makes of pattern, computed without making them (an upper bound where the
    pattern is unusual): a comma list adds its alternatives' counts, a range counts its steps, groups multiply."""
    total = 1
    for kind, text in _groups(pattern):
        if kind == "lit":
            continue
        alternatives = _split_commas(text)
        if len(alternatives) > 1:
            total *= sum(count_names(a) for a in alternatives)
        elif m := _RANGE.match(text) or _ALPHA.match(text):
            lo, hi = m.group(1), m.group(2)
            lo, hi = (int(lo), int(hi)) if lo.lstrip("-").isdigit() else (ord(lo), ord(hi))
            step = abs(int(m.group(3) or 1)) or 1
            total *= abs(hi - lo) // step + 1
        else:
            total *= count_names(text)  # `{x}` stays literal; nested groups inside it still multiply
    return total


def expand(pattern: str, option: str) -> list[str]:
    """The shard names of a brace pattern: counted first (at most MAX_SHARDS), each named once."""
    import braceexpand

    count = count_names(pattern)
    if count > MAX_SHARDS:
        raise VlmcacheError(
            f"{option}: the pattern '{pattern}' names {count:,} shards; at most {MAX_SHARDS:,} per pattern."
        )
    names = list(itertools.islice(braceexpand.braceexpand(pattern), MAX_SHARDS + 1))  # a bound if a count errs
    if len(names) > MAX_SHARDS:
        raise VlmcacheError(f"{option}: the pattern '{pattern}' names over {MAX_SHARDS:,} shards; at most that many.")
    seen: dict[str, str] = {}
    for name in names:
        real = os.path.normpath(name)
        if real in seen:
            raise VlmcacheError(
                f"{option}: the pattern '{pattern}' names the shard '{name}' twice"
                + (f" (also as '{seen[real]}')" if seen[real] != name else "")
                + "; each shard may be listed once."
            )
        seen[real] = name
    return names


# --------------------------------------------------------------------------- one shard


def _header_problem(f, offset: int) -> str:
    """Why the 512-byte block at offset is no tar header (tarfile's own words where it has them)."""
    f.seek(offset)
    block = f.read(BLOCK)
    if len(block) < BLOCK:
        return f"the file ends at byte {offset + len(block)} inside a header or a member's data"
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as e:
        return f"a damaged tar header ({e})"
    return "data tarfile could not read as a header"


def _check_end(shard: Path, f, end: int, size: int) -> None:
    """Everything after the last member (at `end`) must be the end-of-archive zero blocks."""
    where = f"The shard '{shard}'"
    if end > size:
        raise VlmcacheError(
            f"{where} is cut short: its last member ends at byte {end}, the file has {size} bytes. "
            f"Copy or write the shard again."
        )
    f.seek(end)
    head = f.read(2 * BLOCK)
    if head.strip(b"\0"):  # tarfile stopped on a block that is not zeros
        raise VlmcacheError(f"{where}, offset {end}: {_header_problem(f, end)}; the samples after it cannot be read.")
    if len(head) < 2 * BLOCK:
        raise VlmcacheError(
            f"{where} is cut short: it ends at byte {size} without tar's end-of-archive blocks (after offset {end})."
        )
    at = end + len(head)
    while chunk := f.read(1 << 20):  # the record padding: zeros to the end (read a MB at a time, never whole)
        if chunk.strip(b"\0"):
            first = at + len(chunk) - len(chunk.lstrip(b"\0"))
            first -= first % BLOCK
            raise VlmcacheError(
                f"{where}, offset {first}: data after the end-of-archive blocks ({_header_problem(f, first)})."
            )
        at += len(chunk)


def index_shard(shard: Path, relname: str, label_key: str) -> list[tuple]:
    """One shard's samples as webdataset yields them: [(relname, key, image offset, image size, label text)].
    A sample without an image has offset NO_IMAGE, one whose image is over MAX_MEMBER_BYTES has offset TOO_LARGE
    (extraction skips both with the reason); a sample without a label is an error."""
    from webdataset.tariterators import base_plus_ext

    samples: list[dict] = []
    end = 0
    try:
        size = os.stat(shard).st_size
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                end = member.offset_data + (-(-member.size // BLOCK)) * BLOCK
                if not member.isreg() or META.match(member.name):
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None:
                    continue
                ext = ext.lower()
                if not samples or samples[-1]["key"] != key:
                    samples.append({"key": key, "exts": [], "offset": member.offset})
                sample = samples[-1]
                if ext in sample["exts"]:
                    raise VlmcacheError(
                        f"The shard '{shard}', offset {member.offset}: '{member.name}' repeats the extension '{ext}' "
                        f"of the sample '{key}' (webdataset refuses this as a duplicate file name)."
                    )
                sample["exts"].append(ext)
                if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS and "image" not in sample:
                    sample["image"] = (member.offset_data, member.size)
                if ext == label_key:
                    if member.offset_data + member.size > size:
                        break  # cut inside the label: _check_end names it
                    tar.fileobj.seek(member.offset_data)
                    sample["label"] = tar.fileobj.read(min(member.size, MAX_LABEL_BYTES))
            end = max(end, tar.offset)
            _check_end(shard, f, end, size)
    except tarfile.TarError as e:  # "unexpected end of data": a member's data runs past the end of the file
        at = f" (stopped at offset {end})" if end else ""
        raise VlmcacheError(f"The shard '{shard}' is not a readable (uncompressed) tar file{at}: {e}.") from None
    except OSError as e:
        raise VlmcacheError(f"The shard '{shard}' cannot be read: {e.strerror or e}.") from None
    out = []
    for sample in samples:
        label = sample.get("label")
        if label is None:
            raise VlmcacheError(
                f"{shard}: the sample '{sample['key']}' (offset {sample['offset']}) has no .{label_key} member (it "
                f"has: {', '.join(sample['exts'])}); name the label's extension with --label-key."
            )
        offset, nbytes = sample.get("image", (NO_IMAGE, 0))
        if nbytes > MAX_MEMBER_BYTES:
            offset = TOO_LARGE
        out.append((relname, sample["key"], offset, nbytes, label.decode("utf-8", "replace").strip()))
    return out


def skip_reason(offset: int, size: int) -> str | None:
    """Why a TarSource row is skipped without reading it (None when it is read)."""
    if offset == NO_IMAGE:
        return f"the sample has no image member ({', '.join(IMAGE_EXTENSIONS)})"
    if offset == TOO_LARGE:
        return f"its image member is {size:,} bytes, over the {MAX_MEMBER_BYTES >> 20} MB cap"
    return None
