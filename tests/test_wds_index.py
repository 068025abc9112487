"""The strict webdataset index (vlmcache/wds_index.py): damaged and cut shards are errors naming the shard and the
offset, samples group as webdataset's own iterator groups them, brace patterns are counted before they expand,
and a tar fuzz holds "reads the same data or one VlmcacheError, and nothing else changes"."""

import io
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from vlmcache import wds_index
from vlmcache.cli import app
from vlmcache.datasets import load_dataset
from vlmcache.errors import VlmcacheError
from vlmcache.images import BadImage, TarSource


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> list[int]:
    """A plain tar of (name, data) members in order, as tar (and webdataset's TarWriter) write it; returns each
    member's header offset."""
    offsets = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            offsets.append(tar.offset)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return offsets


def _samples(n: int, seed: int = 0) -> list[tuple[str, bytes, int]]:
    return [(f"s{i:03d}", _png(seed * 1000 + i), (i * 7 + seed) % 3) for i in range(n)]


def _members(samples) -> list[tuple[str, bytes]]:
    return [m for key, img, y in samples for m in ((f"{key}.png", img), (f"{key}.cls", str(y).encode()))]


def _read(folder: Path, pattern: str, label_key: str = "cls") -> list[tuple[str, bytes | str, int]]:
    """(key, image bytes or the skip reason, label) per row, through the dataset loader and TarSource."""
    split = load_dataset("wds", root=str(folder), split_files={"train": pattern}, label_key=label_key).split("train")
    out = []
    for i, (_, key, _, _) in enumerate(split.source.members):
        try:
            data = split.source.read_bytes(i)
        except BadImage as e:
            data = str(e)
        out.append((key, data, int(split.labels[i])))
    return out


def _webdataset_reads(path: Path) -> list[tuple[str, bytes, int]]:
    """The reference: webdataset's own iterator over the file (tar_file_iterator + group_by_keys)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(path, "rb") as f:
        files = [{**x, "__url__": str(path)} for x in tar_file_iterator(f)]
    out = []
    for s in group_by_keys(files):
        image = next((v for k, v in s.items() if k.rsplit(".", 1)[-1] in wds_index.IMAGE_EXTENSIONS), None)
        out.append((s["__key__"], image, int(s["cls"])))
    return out


# --------------------------------------------------------------------------- damaged shards


def test_a_cut_shard_names_the_shard_and_where_it_stops(tmp_path):
    samples = _samples(12)
    offsets = _write_tar(tmp_path / "a.tar", _members(samples))
    full = (tmp_path / "a.tar").read_bytes()
    assert [(k, d, y) for k, d, y in _read(tmp_path, "a.tar")] == samples
    last_end = offsets[-1] + 1024  # the last member (a label) is one header and one data block
    for cut in (offsets[14] + 512 + 10, offsets[14] + 100, offsets[14], last_end + 512, last_end):
        (tmp_path / "a.tar").write_bytes(full[:cut])
        # tarfile itself ends quietly on some of these: the reference reads fewer samples, exit 0
        with pytest.raises(VlmcacheError, match=r"a.tar'.*(cut short|offset \d+|end of data)"):
            _read(tmp_path, "a.tar")


def test_a_damaged_header_is_an_error_at_its_offset_where_tarfile_stops_quietly(tmp_path):
    samples = _samples(12)
    offsets = _write_tar(tmp_path / "a.tar", _members(samples))
    data = bytearray((tmp_path / "a.tar").read_bytes())
    data[offsets[14] + 3] ^= 0x55  # a byte of the 8th sample's image header name: its checksum no longer holds
    (tmp_path / "a.tar").write_bytes(bytes(data))
    assert len(_webdataset_reads(tmp_path / "a.tar")) == 7  # what the issue found: 7 of 12, nothing said
    with pytest.raises(VlmcacheError, match=rf"a.tar', offset {offsets[14]}: a damaged tar header \(.*checksum"):
        _read(tmp_path, "a.tar")
    # trailing garbage after the end-of-archive blocks is not ignored either
    _write_tar(tmp_path / "b.tar", _members(samples))
    (tmp_path / "b.tar").write_bytes((tmp_path / "b.tar").read_bytes() + b"\0" * 512 + b"junk" * 200)
    with pytest.raises(VlmcacheError, match="b.tar', offset .*data after the end-of-archive blocks"):
        _read(tmp_path, "b.tar")


# --------------------------------------------------------------------------- grouping


def test_samples_group_as_webdataset_groups_them(tmp_path):
    a, b = _png(1), _png(2)
    # a key seen again after another key is a new sample (webdataset yields three)
    members = [("x.png", a), ("x.cls", b"0"), ("y.png", b), ("y.cls", b"1"), ("x.png", b), ("x.cls", b"2")]
    members += [("__index__", b"{}"), ("Z.PNG", a), ("Z.Cls", b"1")]  # metadata skipped; extensions lower-cased
    _write_tar(tmp_path / "g.tar", members)
    expected = [("x", a, 0), ("y", b, 1), ("x", b, 2), ("Z", a, 1)]
    assert _read(tmp_path, "g.tar") == _webdataset_reads(tmp_path / "g.tar") == expected
    # a repeated extension within one sample: webdataset raises, so do we
    _write_tar(tmp_path / "d.tar", [("x.png", a), ("x.png", b), ("x.cls", b"0")])
    with pytest.raises(ValueError, match="duplicate file name"):
        _webdataset_reads(tmp_path / "d.tar")
    with pytest.raises(VlmcacheError, match=r"d.tar', offset 1024: 'x.png' repeats the extension 'png'"):
        _read(tmp_path, "d.tar")


def test_a_sample_without_an_image_or_with_a_huge_one_is_a_skipped_row(tmp_path, monkeypatch):
    _write_tar(tmp_path / "s.tar", [("a.png", _png(0)), ("a.cls", b"0"), ("b.txt", b"hi"), ("b.cls", b"1"),
                                    ("c.png", _png(1) + b"\0" * 3000), ("c.cls", b"2")])  # fmt: skip
    monkeypatch.setattr(wds_index, "MAX_MEMBER_BYTES", 2048)
    rows = _read(tmp_path, "s.tar")
    assert rows[0] == ("a", _png(0), 0)
    assert rows[1][0] == "b" and "the sample has no image member" in rows[1][1]
    assert rows[2][0] == "c" and "over the 0 MB cap" in rows[2][1] and "3," in rows[2][1]
    src = TarSource(tmp_path, [("s.tar", "b", wds_index.NO_IMAGE, 0)])
    with pytest.raises(BadImage, match="no image member"):  # was: OSError from seek(-1)
        src.load(0)


def test_extract_skips_a_sample_without_an_image_with_its_reason(tmp_path):
    _write_tar(tmp_path / "s.tar", [("a.png", _png(0)), ("a.cls", b"0"), ("b.txt", b"hi"), ("b.cls", b"1"),
                                    ("c.png", _png(1)), ("c.cls", b"1")])  # fmt: skip
    res = CliRunner().invoke(
        app,
        ["extract", "-d", "wds", "--name", "mine", "--root", str(tmp_path), "--shards", "train=s.tar", "--cache-dir",
         str(tmp_path / "c"), "-m", "vlmcache-tiny", "-p", "none", "--device", "cpu", "--workers", "0", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    from vlmcache import cache

    manifest = cache.read_manifest(next((tmp_path / "c" / "mine").iterdir()) / "train")
    skipped = [x for e in manifest["shards"] for x in e["skipped"]]
    assert [(x["path"], x["reason"]) for x in skipped] == [("s.tar/b", skipped[0]["reason"])]
    assert "no image member" in skipped[0]["reason"] and manifest["n_rows"] == 3


# --------------------------------------------------------------------------- patterns


@pytest.mark.parametrize(
    "pattern",
    ["a-{0..9}.tar", "a-{000..120}.tar", "{a,b,c}-{1..3}.tar", "x{a,{b,c}d}{0..4..2}", "p{a..e}", "plain.tar",
     "{x}", "{1..3}{,y}", "a\\{0..3\\}", "{0..10..3}{a,b}"],
)  # fmt: skip
def test_patterns_are_counted_as_braceexpand_expands_them(pattern):
    import braceexpand

    assert wds_index.count_names(pattern) == len(list(braceexpand.braceexpand(pattern)))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="{},.0123ab\\", min_size=1, max_size=12))
@example("}.{{1,2}.,10")  # an unclosed brace before a group: found by this property
def test_a_pattern_is_never_counted_below_its_expansion(pattern):
    """An under-count would let a huge pattern past the limit; unbalanced braces are where counting is hard."""
    import itertools

    import braceexpand

    try:
        n = len(list(itertools.islice(braceexpand.braceexpand(pattern), 10_000)))
    except Exception:  # braceexpand refuses it: so does the loader
        return
    assert wds_index.count_names(pattern) >= n


def test_huge_and_repeating_patterns_are_refused_before_expansion(tmp_path):
    _write_tar(tmp_path / "a.tar", _members(_samples(1)))
    base = ["extract", "-d", "wds", "--root", str(tmp_path), "-m", "vlmcache-tiny", "-p", "none"]
    start = time.perf_counter()
    res = CliRunner().invoke(app, [*base, "--shards", "train=s-{0..999999}-{0..999999}.tar"])
    assert res.exit_code == 2 and "names 1,000,000,000,000 shards; at most 100,000" in res.output, res.output
    assert time.perf_counter() - start < 10
    res = CliRunner().invoke(app, [*base, "--shards", "train=x{{0..999999}{0..999999}.tar"])  # an unclosed brace
    assert res.exit_code == 2 and "1,000,000,000,000 shards" in res.output, res.output
    os.mkfifo(tmp_path / "p.tar")
    res = CliRunner().invoke(app, [*base, "--shards", "train=p.tar", "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2 and "p.tar' is not a regular file" in res.output, res.output
    for pattern, twice in (("{a,a}.tar", "'a.tar' twice"), ("{a,./a}.tar", "'./a.tar' twice (also as 'a.tar')")):
        res = CliRunner().invoke(app, [*base, "--shards", f"train={pattern}", "--cache-dir", str(tmp_path / "c")])
        assert res.exit_code == 2 and twice in res.output and "Traceback" not in res.output, res.output


def test_a_typo_label_obeys_extracts_class_count_rule(tmp_path):
    _write_tar(tmp_path / "a.tar", [("a.png", _png(0)), ("a.cls", b"0"), ("b.png", _png(1)), ("b.cls", b"500000")])
    with pytest.raises(VlmcacheError, match="the label 500000 would make 500001 classes for 2 distinct labels"):
        _read(tmp_path, "a.tar")


# --------------------------------------------------------------------------- fuzz

MUTATIONS = ("none", "truncate", "header_byte", "resealed", "duplicate", "missing_image", "missing_label")


def _reseal(data: bytearray, header: int) -> None:
    """Recompute a header's checksum after a change, as a forger would: tarfile then parses what the fields say."""
    block = data[header : header + 512]
    block[148:156] = b" " * 8
    data[header + 148 : header + 156] = b"%06o\0 " % sum(block)


@settings(max_examples=int(os.environ.get("VLMCACHE_FUZZ", "25")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(n=st.integers(1, 6), kind=st.sampled_from(MUTATIONS), where=st.floats(0, 1), value=st.integers(0, 255))
@example(n=4, kind="header_byte", where=0.6, value=3)  # the cases, always tried: a damaged header,
@example(n=4, kind="truncate", where=0.5, value=0)  # a cut shard,
@example(n=3, kind="duplicate", where=0.5, value=0)  # a member written twice,
@example(n=3, kind="missing_image", where=0.5, value=0)  # a sample without an image
def test_fuzzed_tar_shards_read_the_same_samples_or_one_error(tmp_path_factory, n, kind, where, value):
    """Every generated shard, mutated one way: the index gives exactly the samples written (or the ones the
    mutation leaves, as webdataset reads them), or one VlmcacheError; the shard is not changed."""
    folder = tmp_path_factory.mktemp("fuzz")
    samples = _samples(n, seed=value)
    members = _members(samples)
    pick = min(int(where * n), n - 1)
    expected = samples
    if kind == "duplicate":  # a member written twice in a row
        members.insert(2 * pick + 1, members[2 * pick])
    elif kind == "missing_image":
        del members[2 * pick]
        expected = [s if i != pick else (s[0], "no image member", s[2]) for i, s in enumerate(samples)]
    elif kind == "missing_label":
        del members[2 * pick + 1]
    offsets = _write_tar(folder / "f.tar", members)
    data = bytearray((folder / "f.tar").read_bytes())
    if kind == "truncate":
        data = data[: int(where * (len(data) - 1))]
    elif kind in ("header_byte", "resealed"):
        header = offsets[min(int(where * len(offsets)), len(offsets) - 1)]
        at = header + value % 512
        data[at] = (data[at] + 1 + value) % 256
        if kind == "resealed":
            _reseal(data, header)
    (folder / "f.tar").write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    try:
        reference = _webdataset_reads(folder / "f.tar")
    except Exception:  # webdataset refuses it (a duplicate, a missing or non-integer label)
        reference = None
    try:
        got = _read(folder, "f.tar")
    except VlmcacheError as e:
        assert "f.tar" in str(e)
        assert kind != "none" and kind != "missing_image"
    else:
        assert kind not in ("duplicate", "missing_label")
        if kind == "missing_image":
            assert [(k, y) for k, _, y in got] == [(k, y) for k, _, y in expected]
            assert all(g[1] == e[1] or e[1] in g[1] for g, e in zip(got, expected, strict=True))
        elif kind == "resealed":  # a valid header saying something else: read exactly as webdataset reads it
            assert reference is not None and len(got) == len(reference)
            for (k, d, y), (rk, rd, ry) in zip(got, reference, strict=True):
                assert (k, y) == (rk, ry) and (d == rd if rd is not None else isinstance(d, str))
        else:  # a header byte that left the header valid (its checksum field's padding) reads back unchanged
            assert got == samples
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
