"""Many workers, one folder: torchrun ranks claiming files, --shard splits, and resume after a kill.

The runs are real: torchrun (torch.distributed.run) starts 2 CPU processes that meet over gloo and
the launcher's TCPStore, on the tiny random SD-2.1-layout model, as a user with 2 GPUs would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import photo_like
from icmsr_cli.engines.claims import claimed, parse_shard, shard_of, take_shard
from icmsr_cli.errors import SetupError

N_IMAGES = 4  # two per rank: enough for claims to interleave and for a kill to land mid-run


def _cli(*args, launcher: list[str] | None = None) -> list[str]:
    return [*(launcher or [sys.executable]), "-m", "icmsr_cli", *map(str, args)]


# --standalone: a rendezvous on a free local port, so parallel jobs on one machine never meet
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _env(threads: int) -> dict:
    # each rank takes cores // 2 threads; CPU results depend on the thread count (summation order), so
    # the one-process reference runs with the same count
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def _share() -> int:
    return max(1, len(os.sched_getaffinity(0)) // 2)


@pytest.fixture(autouse=True)
def _temporaries(tmp_path, monkeypatch):
    """torchrun's per-run folders (torchelastic_*) go under the test's own folder: launchers
    killed on purpose cannot remove theirs, and four were left in /tmp by every run of this file."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))


@pytest.fixture()
def folder(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for i in range(N_IMAGES):
        Image.fromarray(photo_like(32, 24, seed=i)).save(src / ("sub" if i % 2 else ".") / f"img{i}.png")
    return src


def _lines(stdout: bytes) -> list[dict]:
    return [json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")]


def test_two_ranks_write_every_file_once_equal_to_one_process(tmp_path, folder, tiny_base, tiny_lora):
    (folder / "broken.png").write_bytes(b"not an image")
    model = ("--base", tiny_base, "--lora", tiny_lora, "--tile", "off", "-r")
    one = subprocess.run(_cli("upscale", folder, "-o", tmp_path / "one", *model, "-q"), capture_output=True,
                         env=_env(_share()), timeout=300)
    assert one.returncode == 1, one.stderr.decode()  # the broken file
    many = subprocess.run(_cli("upscale", folder, "-o", tmp_path / "many", *model, "--json", launcher=TORCHRUN),
                          capture_output=True, env=_env(_share()), timeout=300)
    assert many.returncode != 0, "a broken file anywhere fails the run"
    lines = _lines(many.stdout)
    inputs = sorted(line["input"] for line in lines)
    assert inputs == sorted([str(folder / "broken.png")] + [str(p) for p in folder.rglob("img*.png")]), "every file exactly once"
    assert {line["rank"] for line in lines} <= {0, 1}
    assert [line["status"] for line in lines].count("failed") == 1
    stderr = many.stderr.decode()
    assert stderr.count(f"{N_IMAGES} done, 0 skipped, 1 failed") == 1, "rank 0 alone prints the summed summary"
    assert "cannot read image" in stderr
    produced = sorted(p.relative_to(tmp_path / "many") for p in (tmp_path / "many").rglob("*.png"))
    assert produced == sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert len(produced) == N_IMAGES
    for rel in produced:
        assert (tmp_path / "many" / rel).read_bytes() == (tmp_path / "one" / rel).read_bytes(), rel


def test_killed_ranks_lose_only_files_in_flight_and_the_rerun_finishes(tmp_path, folder, tiny_base, tiny_lora):
    out = tmp_path / "out"
    args = _cli("upscale", folder, "-o", out, "--base", tiny_base, "--lora", tiny_lora, "--tile", "off", "-r", "-q",
                launcher=TORCHRUN)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (out.is_dir() and list(out.rglob("*.png"))):
        time.sleep(0.05)
    # the launcher and both ranks at once, as a node failure would (torchrun starts each rank in a session of its own)
    import psutil

    everyone = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for p in everyone:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(everyone, timeout=30)
    proc.wait()
    finished = list(out.rglob("*.png"))
    assert 0 < len(finished) < N_IMAGES, "the kill should land mid-run"
    for path in finished:
        with Image.open(path) as im:
            im.load()
            assert im.size == (128, 96)
    rerun = subprocess.run(_cli("upscale", folder, "-o", out, "--base", tiny_base, "--lora", tiny_lora, "--tile", "off", "-r",
                                "--json", launcher=TORCHRUN), capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    statuses = sorted(line["status"] for line in _lines(rerun.stdout))
    assert statuses.count("skipped") == len(finished) and statuses.count("done") == N_IMAGES - len(finished)
    everything = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert everything == sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png")), "no temporaries may remain"


def test_ranks_whose_launcher_died_stop_with_one_line(tmp_path, folder, tiny_base, tiny_lora):
    """torchrun killed alone: its store is gone, so each orphaned rank finishes the file in hand and
    stops at its next claim with one line, instead of a traceback or a wait for a collective timeout."""
    # more files than the others' four: each rank claims one file ahead of its model, so with four
    # both could hold their last claims (and their past-the-end ones) by the time the first output
    # appears, finish without the store, and say nothing (seen once on CI)
    for i in range(N_IMAGES, 3 * N_IMAGES):
        Image.fromarray(photo_like(32, 24, seed=i)).save(folder / f"img{i}.png")
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("upscale", folder, "-o", out, "--base", tiny_base, "--lora", tiny_lora, "--tile", "off", "-r",
                                 "-q", launcher=TORCHRUN), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not (out.is_dir() and list(out.rglob("*.png"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stderr = proc.stderr.read().decode()  # end of file once both orphaned ranks have exited
    assert stderr.count("lost contact with the other ranks") == 2, stderr
    assert "Traceback" not in stderr
    assert all(p.stat().st_size > 0 for p in out.rglob("*.png"))


def test_shards_split_a_folder_with_no_overlap_and_no_gap(tmp_path, folder, tiny_base, tiny_lora):
    model = ("--base", tiny_base, "--lora", tiny_lora, "--tile", "off", "-r", "--json", "-q")
    seen = []
    for index in range(2):
        proc = subprocess.run(_cli("upscale", folder, "-o", tmp_path / "out", *model, "--shard", f"{index}/2"),
                              capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()
        seen.append({line["input"] for line in _lines(proc.stdout)})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {str(p) for p in folder.rglob("*.png")}
    assert len(list((tmp_path / "out").rglob("*.png"))) == N_IMAGES


def test_a_shard_with_no_file_says_so_and_no_images_anywhere_is_an_error(tmp_path):
    """A shard that drew no file exited 0 in silence, and so did every shard of an empty folder
    (without --shard that is "no images found", exit 2)."""
    from typer.testing import CliRunner

    from icmsr_cli.cli import app

    Image.fromarray(photo_like(8, 8)).save(tmp_path / "one.png")
    empty = CliRunner().invoke(app, ["upscale", str(tmp_path / "one.png"), "-o", str(tmp_path / "out") + "/",
                                     "--shard", f"{1 - shard_of('one.png', 2)}/2"])
    assert empty.exit_code == 0 and "no image falls in this shard (1 in all); nothing to do" in empty.stderr
    (tmp_path / "nothing").mkdir()
    for index in range(2):
        result = CliRunner().invoke(app, ["upscale", str(tmp_path / "nothing"), "-o", str(tmp_path / "out"), "--shard", f"{index}/2"])
        assert result.exit_code == 2 and "no images found" in result.stderr


def test_shard_of_is_stable_disjoint_and_complete():
    keys = [f"album{i % 7}/IMG_{i:05d}.jpg" for i in range(2000)]
    shards = [take_shard(keys, str, i, 8) for i in range(8)]
    assert sorted(k for s in shards for k in s) == sorted(keys)
    assert all(len(s) > 150 for s in shards)  # a fair split, not everything in one shard
    # a file keeps its shard when others come and go, and across processes (not Python's salted hash)
    assert take_shard(keys[:1000], str, 3, 8) == [k for k in shards[3] if k in set(keys[:1000])]
    assert shard_of("album0/IMG_00000.jpg", 8) == int.from_bytes(
        __import__("hashlib").sha1(b"album0/IMG_00000.jpg").digest()[:8], "big") % 8


def test_claims_hand_out_each_item_once():
    counter = iter(range(100))
    items = list("abcdef")
    first, second = claimed(items, lambda: next(counter)), claimed(items, lambda: next(counter))
    got = [next(first), next(second), next(second), next(first), *second, *first]
    assert sorted(got) == items


@pytest.mark.parametrize("text", ["2/2", "a/2", "1", "-1/2", "1/0"])
def test_bad_shard_is_a_usage_error(text):
    with pytest.raises(SetupError, match="expected I/N"):
        parse_shard(text)
