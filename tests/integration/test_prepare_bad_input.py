"""The bad-input zoo through the real CLI: every bad clip becomes a quarantine row with its stage
and reason, the good clips are all written, and the job exits 0 with a summary counting them."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from tests.integration.conftest import clipvip, parquet_tables


def _first_video(sample):
    with open(sample.metadata_path) as f:
        return json.loads(f.readline())


def build_zoo(sample, d):
    """A dataset dir whose metadata mixes good videos with every kind of bad input."""
    vids = os.path.join(d, "videos")
    shutil.copytree(sample.video_root, vids)
    good = [json.loads(line) for line in open(sample.metadata_path)]
    subs = [json.loads(line) for line in open(sample.subtitles_table)]
    donor = good[0]
    donor_file = os.path.join(vids, donor["video_id"] + ".mp4")
    data = open(donor_file, "rb").read()

    def entry(video_id, spans):
        return {"video_id": video_id, "url": f"https://www.youtube.com/watch?v={video_id}",
                "clip": [{"clip_id": f"{video_id}.{i}.mp4", "span": s} for i, s in enumerate(spans)]}

    # Seeded garbage: about 1 random file in 600 probes as a one-frame raw H.263 stream, which
    # fails at the span stage (or, without a frame size, at open), so os.urandom made this flaky.
    open(os.path.join(vids, "corruptvid01.mp4"), "wb").write(np.random.default_rng(0).bytes(50_000))
    open(os.path.join(vids, "truncvideo1.mp4"), "wb").write(data[: len(data) // 3])
    open(os.path.join(vids, "notavideo01.mp4"), "w").write("this is a text file, not a video\n" * 100)
    open(os.path.join(vids, "emptyvideo1.mp4"), "wb").close()
    shutil.copy(donor_file, os.path.join(vids, "badspans001.mp4"))
    shutil.copy(donor_file, os.path.join(vids, "badsubtitle.mp4"))
    ok_span = ["00:00:00.500", "00:00:02.500"]
    bad = [
        entry("corruptvid01", [ok_span]),
        entry("truncvideo1", [ok_span, ["00:00:02.800", "00:00:03.900"]]),
        entry("missingvid1", [ok_span]),
        entry("notavideo01", [ok_span]),
        entry("emptyvideo1", [ok_span]),
        entry("badspans001", [["00:00:03.000", "00:00:02.000"], ["00:09:00.000", "00:09:05.000"], ok_span]),
        entry("badsubtitle", [ok_span, ["00:00:02.600", "00:00:03.500"]]),
    ]
    meta = os.path.join(d, "meta.jsonl")
    with open(meta, "wb") as f:
        for v in good[:2]:
            f.write((json.dumps(v) + "\n").encode())
        f.write(b'{"video_id": "brokenjson", "clip": [\n')             # line 3: bad JSON
        f.write(b'{"video_id": "noclips0001", "url": "u"}\n')          # line 4: no clip list
        f.write((json.dumps(entry("badtimestmp", [["soon", "later"]])) + "\n").encode())  # line 5
        for v in bad:
            f.write((json.dumps(v) + "\n").encode())
    table = os.path.join(d, "subs.jsonl")
    with open(table, "wb") as f:
        for s in subs:
            f.write((json.dumps(s) + "\n").encode())
        f.write((json.dumps({"clip_id": subs[0]["clip_id"], "text": "a later duplicate row"}) + "\n").encode())
        f.write(b"{not json\n")
        for v in bad:
            for c in v["clip"]:
                if c["clip_id"] == "badsubtitle.0.mp4":
                    f.write(b'{"clip_id": "badsubtitle.0.mp4", "text": "caf\xe9 latin-1 bytes"}\n')
                elif c["clip_id"] != "badsubtitle.1.mp4":  # .1 has no subtitle at all
                    f.write((json.dumps({"clip_id": c["clip_id"], "text": "a red circle moves left"}) + "\n").encode())
    good_ids = {c["clip_id"] for v in good[:2] for c in v["clip"]} | {"badspans001.2.mp4"}
    return meta, vids, table, good_ids


def test_bad_input_zoo(sample_data, tmp_path):
    meta, vids, table, good_ids = build_zoo(sample_data, str(tmp_path / "in"))
    root = str(tmp_path / "root")
    proc = clipvip("prepare", "--set", f"root={root}", "--set", f"data.metadata={meta}",
                   "--set", f"data.video_root={vids}", "--set", f"data.subtitles={table}",
                   "--set", "data.clips_per_shard=3", "--set", "caption.model=builtin:tiny-blip",
                   "--set", "frames.short_side_px=64", "--set", "ray.num_cpus=2", "--set", "ray.progress_bars=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prepare summary" in proc.stdout and "quarantined" in proc.stdout

    written = set()
    for t in parquet_tables(root, "frames").values():
        written |= set(t.column("clip_id").to_pylist())
    assert good_ids <= written, "every good clip is written"
    assert not any(c.split(".")[0] in {"corruptvid01", "missingvid1", "notavideo01", "emptyvideo1"} for c in written)

    rows = []
    for t in parquet_tables(root, "quarantine").values():
        rows += t.to_pylist()
    q = {r["clip_id"]: r for r in rows if r["clip_id"]}
    assert q["corruptvid01.0.mp4"]["stage"] == "open"
    assert q["notavideo01.0.mp4"]["stage"] == "open"
    assert q["emptyvideo1.0.mp4"]["stage"] == "open"
    assert q["missingvid1.0.mp4"]["stage"] == "open" and "not found" in q["missingvid1.0.mp4"]["error"]
    assert q["badspans001.0.mp4"]["stage"] == "span"
    assert q["badspans001.1.mp4"]["stage"] == "span"
    assert q["badsubtitle.0.mp4"]["stage"] == "subtitle" and "UTF-8" in q["badsubtitle.0.mp4"]["error"]
    assert q["badsubtitle.1.mp4"]["stage"] == "subtitle"
    trunc = [r for k, r in q.items() if k.startswith("truncvideo1")]
    assert trunc and all(r["stage"] in ("open", "decode") for r in trunc)
    meta_rows = [r for r in rows if r["stage"] == "metadata"]
    assert len(meta_rows) == 3
    # The subtitle table's own problems: the first row of a clip wins, a later one and a broken
    # line are quarantine rows of the table (no clip lost, none doubled).
    table_rows = [r["error"] for r in rows if r["stage"] == "subtitle" and not r["clip_id"]]
    assert len(table_rows) == 2 and any("duplicate clip_id" in e for e in table_rows), table_rows
    first_sub = json.loads(open(table, "rb").readline())
    subtitle = {c: s for t in parquet_tables(root, "frames").values()
                for c, s in zip(t.column("clip_id").to_pylist(), t.column("subtitle").to_pylist())}
    assert subtitle[first_sub["clip_id"]] == " ".join(first_sub["text"].split())
    assert {r["error"].split(":")[1] for r in meta_rows} == {"3", "4", "5"}, [r["error"] for r in meta_rows]

    man = json.load(open(os.path.join(root, "manifest.json")))
    assert man["counts"]["clips_ok"] == len(written)
    assert man["counts"]["metadata_issues"] == 3 + 2


def test_inputs_that_yield_nothing_are_refused(sample_data, tmp_path):
    """An empty metadata part, a subtitle table passed as metadata, a video root holding none of
    the videos: each exits 2 naming the key, and no root is left marked complete."""
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    no_videos = tmp_path / "novideos"
    no_videos.mkdir()
    (no_videos / "unrelated.mp4").write_bytes(b"x")
    cases = [
        ({"data.metadata": str(empty)}, "data.metadata"),
        ({"data.metadata": sample_data.subtitles_table}, "data.metadata"),
        ({"data.video_root": str(no_videos)}, "data.video_root"),
    ]
    for i, (sets, key) in enumerate(cases):
        root = tmp_path / f"root{i}"
        args = {"root": str(root), "data.metadata": sample_data.metadata_path,
                "data.video_root": sample_data.video_root, "data.subtitles": sample_data.subtitles_table,
                "caption.model": "builtin:tiny-blip", "ray.num_cpus": "2", "ray.progress_bars": "false", **sets}
        proc = clipvip("prepare", *[a for k, v in args.items() for a in ("--set", f"{k}={v}")])
        assert proc.returncode == 2, (key, proc.stdout[-2000:], proc.stderr[-2000:])
        assert f"prepare refused: {key}" in proc.stderr, proc.stderr[-2000:]
        manifest = root / "manifest.json"
        assert not manifest.exists() or json.loads(manifest.read_text())["status"] != "complete"
    assert "unrelated.mp4" in proc.stderr  # says what the video root does hold
