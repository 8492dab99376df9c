"""A user's checkpoint tags are never deleted by the real pretraining entry (one plain-python rank,
ZeRO-1): tags without their ``complete`` marker in a --load dir that is not the --save dir are
skipped and left as they are; in the run's own --save dir the leftover of a save that did not
finish is renamed ``<tag>.incomplete`` (a free name) before that step is saved again. Three 3-step
runs, ~7 s each here."""
import hashlib
import shutil
import subprocess
import sys

import pytest

from test_train_runs import ENV, REPO, make_config


def pretrain(cfg, save, *extra):
    cmd = [sys.executable, str(REPO / "megagpt/train/pretrain.py"), "--config", cfg,
           "--deepspeed_config", str(REPO / "ds_configs/zero1.json"), "--save", str(save), *extra]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def snapshot(root):
    """Every file under ``root`` with its sha256: what a run must leave as it found."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, shakespeare_prefix, sp_model):
    """(config, save dir) of a 3-step run saving at steps 2 and 3."""
    d = tmp_path_factory.mktemp("three_steps")
    cfg = make_config(d / "c.yaml", shakespeare_prefix, sp_model,
                      train={"train_iters": 3, "save_interval": 2, "eval_interval": 0, "log_interval": 1,
                             "micro_batch_size": 2, "keep_last": 0})
    r = pretrain(cfg, d / "ckpt")
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg, d / "ckpt"


def test_unmarked_tags_of_another_load_dir_are_left_as_they_are(tmp_path, three_steps):
    cfg, ckpt = three_steps
    load = tmp_path / "L9"
    shutil.copytree(ckpt, load)
    (load / "latest").unlink()
    for marker in load.glob("global_step*/complete"):
        marker.unlink()
    before = snapshot(load)
    r = pretrain(cfg, tmp_path / "out", "--load", str(load))
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    assert snapshot(load) == before   # nothing deleted, renamed or written
    said = [ln for ln in r.stdout.splitlines() if "skipping global_step2, global_step3" in ln]
    assert len(said) == 1 and str(load) in said[0] and "left as they are" in said[0], r.stdout[-3000:]
    assert (tmp_path / "out" / "global_step3" / "complete").is_file()


def test_a_leftover_in_the_save_dir_is_set_aside_under_a_free_name(tmp_path, three_steps):
    """A crash after step 3's files, before its marker: the resume starts from step 2 and saving step 3
    again first renames the leftover (global_step3.incomplete is taken: global_step3.incomplete1)."""
    cfg, ckpt = three_steps
    save = tmp_path / "run"
    shutil.copytree(ckpt, save)
    (save / "global_step3" / "complete").unlink()
    leftover = snapshot(save / "global_step3")
    (save / "global_step3.incomplete").mkdir()
    (save / "global_step3.incomplete" / "mine").write_text("an earlier one\n")
    r = pretrain(cfg, save, "--load", str(save))
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "global_step2 at step 2" in r.stdout, r.stdout[-3000:]
    assert snapshot(save / "global_step3.incomplete1") == leftover
    said = [ln for ln in r.stdout.splitlines() if "global_step3 -> global_step3.incomplete1" in ln]
    assert len(said) == 1 and said[0].startswith("warning: ") and "no 'complete' marker" in said[0], r.stdout
    assert (save / "global_step3.incomplete" / "mine").read_text() == "an earlier one\n"
    assert (save / "global_step3" / "complete").is_file() and (save / "latest").read_text() == "global_step3"


def test_a_fresh_start_never_writes_over_a_run_in_its_save_dir(tmp_path, three_steps):
    """No --load (or a --load holding nothing) into a --save that holds a run: refused, nothing touched."""
    cfg, ckpt = three_steps
    save = tmp_path / "run"
    shutil.copytree(ckpt, save)
    before = snapshot(save)
    r = pretrain(cfg, save)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    assert errors[0].endswith(f"key 'train.save': {save} already holds a run (global_step3): resume it with --load "
                              f"{save}, or save this one elsewhere"), errors
    assert snapshot(save) == before


def test_a_resume_refuses_another_tokenizer_and_reports_other_data(tmp_path, three_steps, shakespeare_txt):
    """Shards and tokenizer both replaced by another pair that agree with each other: the checkpoint's
    weights would read other ids (refused before launch). Another data split or seed is allowed (a data
    switch mid-run can be meant) but said, key by key."""
    from megagpt.data.preprocess import preprocess
    from megagpt.tokenizer import train_sentencepiece

    cfg, ckpt = three_steps
    other = str(tmp_path / "other")
    train_sentencepiece([str(shakespeare_txt)], other, vocab_size=1000, model_type="unigram")
    preprocess([str(shakespeare_txt)], str(tmp_path / "shards"), other + ".model", split_paragraphs=True, workers=1)
    save = tmp_path / "run"
    shutil.copytree(ckpt, save)
    before = snapshot(save)
    r = pretrain(cfg, save, "--load", str(save), "--train-iters", "4", "--tokenizer", other + ".model",
                 "--data-path", str(tmp_path / "shards_text_document"))
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "key 'data.tokenizer'" in errors[0] and "is not the tokenizer" in errors[0] and "global_step3" in errors[0]
    assert snapshot(save) == before
    r = pretrain(cfg, save, "--load", str(save), "--train-iters", "4", "--split", "900,100,0", "--data-seed", "9")
    assert r.returncode == 0, r.stderr[-3000:]
    said = [ln for ln in r.stdout.splitlines() if ln.startswith("warning: resuming with other data settings")]
    assert len(said) == 1 and "split '949,50,1' -> '900,100,0'" in said[0] and "seed 1234 -> 9" in said[0], said
    assert "resumed from" in r.stdout and (save / "global_step4" / "complete").is_file()
