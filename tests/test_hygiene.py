"""What a new user running the README meets: the per-environment DeepSpeed caches (ops, CPU
description), ignored output folders, tools' outputs published atomically with normal permissions,
no progress-bar carriage returns in logs."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from megagpt import envsetup

REPO = Path(__file__).resolve().parents[1]


def _run(args, **kw):
    """Output decoded without universal newlines (text=True would turn every \\r into \\n)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, **kw)
    res.stdout, res.stderr = res.stdout.decode(), res.stderr.decode()
    return res


def test_torch_extensions_dir_is_per_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = envsetup.torch_extensions_dir()
    assert here == envsetup.torch_extensions_dir() and here.startswith(str(tmp_path / "torch_extensions"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    assert envsetup.torch_extensions_dir() != here


def test_set_torch_extensions_dir_is_what_torch_builds_into(monkeypatch, tmp_path):
    """setdefault semantics (an explicit TORCH_EXTENSIONS_DIR wins), and torch's JIT loader (which
    DeepSpeed's op builders call) really builds under the directory set."""
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    d = envsetup.set_torch_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == d == envsetup.torch_extensions_dir()
    assert _get_build_directory("cpu_adam", verbose=False) == os.path.join(d, "cpu_adam")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert envsetup.set_torch_extensions_dir() == str(tmp_path / "mine")


def test_setup_script_and_launcher_use_the_same_directory(tmp_path):
    """setup_env.sh pre-builds into what ``python megagpt/envsetup.py`` prints, the function the
    entry points call; the launch CLI passes it on to the trainers it execs."""
    script = (REPO / "scripts" / "setup_env.sh").read_text()
    export = script.index("export TORCH_EXTENSIONS_DIR")
    assert '"$PY" megagpt/envsetup.py' in script[:export] and script.index("builder.load(") > export
    printed = _run(["megagpt/envsetup.py"], check=True).stdout.strip()
    assert printed == envsetup.torch_extensions_dir()
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    trainer = tmp_path / "trainer.py"
    trainer.write_text("import os; print(os.environ['TORCH_EXTENSIONS_DIR'])\n")
    out = subprocess.run([sys.executable, "-m", "megagpt.cluster.launch", "exec-task", str(trainer)],
                         cwd=REPO, capture_output=True, text=True, check=True,
                         env={**env, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
                              "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost"})
    assert out.stdout.strip() == printed


def test_output_folders_are_ignored():
    res = subprocess.run(["git", "check-ignore", "out/ckpt/latest", "checkpoints/x", ".best.old-12-ab/w"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.stdout.split() == ["out/ckpt/latest", "checkpoints/x", ".best.old-12-ab/w"]


def test_tools_publish_with_normal_permissions_and_log_without_carriage_returns(tmp_path, shakespeare_txt):
    """train_tokenizer and preprocess_data run as in the README with output piped (as under
    nohup or a batch system): files are 0o644 under umask 022, no temp entries remain, and the
    logs hold no ``\\r`` progress-bar redraws."""
    old = os.umask(0o022)
    try:
        tok = _run(["tools/train_tokenizer.py", "--input", str(shakespeare_txt), "--vocab-size", "400",
                    "--input-sentence-size", "3000", "--workers", "1", "--output-prefix", str(tmp_path / "tok" / "sp")])
        assert tok.returncode == 0, tok.stderr
        pre = _run(["tools/preprocess_data.py", "--input", str(shakespeare_txt), "--split-paragraphs",
                    "--tokenizer-model", str(tmp_path / "tok" / "sp.model"), "--workers", "1",
                    "--output-prefix", str(tmp_path / "data" / "shk"), "--log-interval", "0"])
        assert pre.returncode == 0, pre.stderr
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path / "tok")) == ["sp.model", "sp.vocab"]
    assert sorted(os.listdir(tmp_path / "data")) == ["shk_text_document.bin", "shk_text_document.idx",
                                                        "shk_text_document.meta.json"]
    for p in [*(tmp_path / "tok").iterdir(), *(tmp_path / "data").iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    for res in (tok, pre):
        assert "\r" not in res.stdout + res.stderr


def test_cpu_info_is_asked_once_per_cpu(monkeypatch, tmp_path):
    """py-cpuinfo is asked once: its answer is kept in a file of this CPU, and each caller gets its
    own copy. The file is keyed by what identifies the CPU (not its clock)."""
    import json

    import cpuinfo

    answer, asked = {"arch": "X86_64", "flags": ["avx2", "avx512f"], "vendor_id_raw": "AuthenticAMD"}, []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: asked.append(1) or json.loads(json.dumps(answer)))
    envsetup.cache_cpu_info()
    envsetup.cache_cpu_info()   # a second call does not wrap the wrapper
    cpuinfo.get_cpu_info()["flags"].append("changed by a caller")
    assert cpuinfo.get_cpu_info() == answer and len(asked) == 1
    [kept] = tmp_path.glob("cpuinfo-*.json")
    assert json.loads(kept.read_text()) == answer
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: asked.append(1) or answer)   # the next process
    envsetup.cache_cpu_info()
    assert cpuinfo.get_cpu_info() == answer and len(asked) == 1
    kept.write_text('{"arch": "X86')   # a torn file: asked again, and rewritten
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: asked.append(1) or answer)
    envsetup.cache_cpu_info()
    assert cpuinfo.get_cpu_info() == answer and len(asked) == 2 and json.loads(kept.read_text()) == answer

    def proc(mhz, flags):
        f = tmp_path / f"cpuinfo-{mhz}-{flags}"
        f.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\ncpu MHz\t\t: {mhz}\n"
                     f"flags\t\t: fpu {flags}\n")
        return envsetup.cpu_info_path(str(f))
    assert proc(2400.1, "avx2") == proc(3100.7, "avx2") != proc(2400.1, "avx2 avx512f")
    assert envsetup.cpu_info_path(str(tmp_path / "no-such-file")) is None


@pytest.mark.slow
def test_deepspeed_op_builders_read_the_kept_cpu_info(tmp_path):
    """Through DeepSpeed's own CPU op builder: the same compiler flags, py-cpuinfo run once for a
    fresh cache (twice without megagpt's cache) and not at all by the next process."""
    script = (
        "import cpuinfo.cpuinfo as c; runs = []; ask = c.get_cpu_info_json\n"
        "c.get_cpu_info_json = lambda: runs.append(1) or ask()\n"
        "from deepspeed.ops.op_builder.cpu import FusedAdamBuilder\n"
        "import sys; from megagpt.envsetup import prepare_deepspeed\n"
        "plain = FusedAdamBuilder().cxx_args() if sys.argv[1] == 'first' else None; before = len(runs)\n"
        "prepare_deepspeed(); cached = FusedAdamBuilder().cxx_args()\n"
        "print(before, len(runs) - before, plain == cached or plain is None, ' '.join(cached))\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    first, second = (subprocess.run([sys.executable, "-c", script, leg], cwd=REPO, env=env, capture_output=True,
                                    text=True, check=True).stdout.splitlines()[-1].split(maxsplit=3)
                     for leg in ("first", "second"))
    assert first[:3] == ["2", "1", "True"] and second[:3] == ["0", "0", "True"], (first, second)
    assert first[3] == second[3] and "-march=native" in first[3]
