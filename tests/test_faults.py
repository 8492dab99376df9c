"""Faults through the real pretraining entry (the `deepspeed` launcher, 2 gloo ranks): a rank that
dies or hangs, a disk that fills up during a save, a checkpoint damaged on disk afterwards.

Bounds, measured here: with ``distributed_timeout_minutes=0.1`` a hung rank ends the job in about
50 s (launch ~15 s, the 6 s timeout, then DeepSpeed's launcher gives the hung process 30 s
after SIGTERM before SIGKILL); a killed rank in about 15 s (its peers see the closed connection
at once).
"""
import os
import subprocess
import time
import uuid

import pytest
import yaml

from test_layouts import legacy, legacy_data  # noqa: F401  (legacy_data: the fixture)
from test_train_runs import launch, losses, n_lines, ok

pytestmark = pytest.mark.slow


def config(path, data, debug=None, **train):
    legacy.config(path, *data, **train)
    cfg = yaml.safe_load(path.read_text())
    cfg["debug"] = debug or {}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def errors(r):
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error:")]


def leftovers(marker):
    return subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()


@pytest.mark.parametrize("fault", ["hang_at_step", "kill_at_step"])
def test_a_lost_rank_stops_the_job_naming_it_and_leaves_no_process(tmp_path, legacy_data, fault):  # noqa: F811
    marker = f"c-{uuid.uuid4().hex}.yaml"   # in every rank's command line
    cfg = config(tmp_path / marker, legacy_data, {fault: 3}, distributed_timeout_minutes=0.1, train_iters=6)
    t0 = time.monotonic()
    r = launch(cfg, "zero1.json", tmp_path / "ckpt", timeout=240)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0 and elapsed < 120, (r.returncode, elapsed)
    lines = errors(r)
    assert len(lines) == 1 and "rank 1 stopped responding" in lines[0] and "at step 3" in lines[0], \
        r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert leftovers(marker) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 1.2 MB tmpfs: room for one checkpoint tag of the tiny model (~0.8 MB), not two."""
    d = tmp_path / "disk"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(d)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    yield d
    subprocess.run(["umount", "-l", str(d)])


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, legacy_data, small_disk):  # noqa: F811
    from megagpt.checkpoint.engine import verify_tag

    cfg = config(tmp_path / "c.yaml", legacy_data, train_iters=6, save_interval=2, keep_last=0,
                 tensorboard_dir=str(tmp_path / "tb"))
    save = small_disk / "ckpt"
    r = launch(cfg, "zero1.json", save)
    assert r.returncode != 0
    lines = errors(r)
    assert len(lines) == 1 and "global_step4: saving failed" in lines[0] and "the disk is full" in lines[0] \
        and "global_step2) is untouched" in lines[0], r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step2"]   # the partial tag is gone
    assert verify_tag(str(save / "global_step2")) is None and (save / "global_step2" / "complete").is_file()


def test_a_damaged_newest_tag_falls_back_to_the_previous_one(tmp_path, legacy_data):  # noqa: F811
    """Same size, one byte flipped (only the manifest's sha256 sees it): the tag is set aside, the
    run resumes from the one before and logs every loss that the run, undamaged, logged after it
    (the run that wrote both tags is the never-damaged reference: no separate straight run)."""
    cfg = config(tmp_path / "c.yaml", legacy_data, train_iters=4, save_interval=2, keep_last=0)
    save = tmp_path / "ckpt"
    ok(launch(cfg, "zero1.json", save))   # tags 2 and 4
    want, logged = losses(save), n_lines(save)
    assert sorted(want) == list(range(1, 5)), want
    f = save / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))

    r = launch(cfg, "zero1.json", save, "--load", str(save), "--no-checkpoint-fallback")
    lines = errors(r)
    assert r.returncode != 0 and len(lines) == 1 and "global_step4: damaged" in lines[0] \
        and "zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its sha256" in lines[0], lines
    assert (save / "global_step4").is_dir()   # refused: nothing moved

    r = ok(launch(cfg, "zero1.json", save, "--load", str(save)))
    assert "renamed it global_step4.damaged" in r.stdout and "at step 2" in r.stdout, r.stdout[-2000:]
    assert (save / "global_step4.damaged").is_dir()
    got = losses(save, logged)   # the resumed run's lines only
    assert sorted(got) == [3, 4], got
    assert all(got[s] == want[s] for s in got), (want, got)
