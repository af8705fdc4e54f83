"""Run folders that cannot lie: the lock on a folder while a process trains into it, the check
of a resumed config, metrics.jsonl after a crash, leftovers of interrupted checkpoint writes,
names that cannot escape their folder, and one clear line for every file-system error,
damaged run file and checkpoint of another model."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, tiny_overrides
from safetensors import SafetensorError

from condcomp import checkpoint as ckpt_lib
from condcomp import run_lock
from condcomp.checkpoint import list_checkpoints
from condcomp.cli import main
from condcomp.compare import load_suite
from condcomp.config import load_config
from condcomp.errors import ConfigError, StorageError
from condcomp.run_lock import RunLock
from condcomp.runs import read_metrics
from condcomp.train import train


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """A 10-step run (checkpoints at 5 and 10), and the folder its data cache lives in."""
    tmp = tmp_path_factory.mktemp("trained")
    train(load_config("dense_tiny", tiny_overrides(corpus, tmp, "run", steps=10)), log=quiet)
    return tmp / "run", tmp


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    return run_dir


def train_args(corpus: Path, run_dir: Path, *extra: str, steps: int = 10) -> list[str]:
    args = ["train", "--config", "dense_tiny"]
    for item in tiny_overrides(corpus, run_dir.parent, run_dir.name, steps=steps):
        args += ["--set", item]
    return args + list(extra)


def one_line_error(capsys, code: int) -> str:
    """The error line of a command that must have stopped with exit code 2 and one line."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("condcomp: error: ")
    return err


def steps_by_kind(run_dir: Path) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for row in read_metrics(run_dir):
        rows.setdefault(row["kind"], []).append(row["step"])
    return rows


# ------------------------------------------------------------------------------- the lock


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that holds ``run_dir``'s lock until it is killed."""
    code = ("import sys, time; from condcomp.run_lock import RunLock; "
            "RunLock(sys.argv[1], log=lambda s: None).__enter__(); print('locked', flush=True); "
            "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline() == b"locked\n"
    return proc


def test_a_second_process_stops_naming_the_holder_and_a_dead_holder_is_taken_over(
        run_copy, corpus, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in run_copy.iterdir()}
    holder = hold_lock(run_copy)
    try:
        for extra in ([], ["--resume"]):
            err = one_line_error(capsys, main(train_args(corpus, run_copy, *extra, steps=12)))
            assert f"run folder {run_copy} is in use by pid {holder.pid} on host" in err
            assert "python -c" in err and "since" in err
        # Refused before writing anything: the record is the first run's, untouched.
        after = {p.name: p.stat().st_mtime_ns for p in run_copy.iterdir() if p.name != ".lock"}
        assert after == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the dead holder's lock; its details are still in the file.
    assert json.loads((run_copy / ".lock").read_text())["pid"] == holder.pid
    notes = []
    train(load_config("dense_tiny", tiny_overrides(corpus, run_copy.parent, "run", steps=12)),
          resume=True, log=notes.append)
    assert any(f"last locked by pid {holder.pid}" in n and "taking it over" in n for n in notes)
    assert not (run_copy / ".lock").exists()  # released at the end


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path / "run", log=quiet), pytest.raises(run_lock.RunLockedError,
                                                           match=f"pid {os.getpid()}"):
        RunLock(tmp_path / "run", log=quiet).__enter__()


def test_a_lock_that_created_the_folder_leaves_none_behind(tmp_path):
    with RunLock(tmp_path / "new", log=quiet):
        assert (tmp_path / "new" / ".lock").is_file()
    assert not (tmp_path / "new").exists()


def test_without_file_locks_the_details_are_the_lock(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    here = run_lock.Holder.this_process()
    for holder, refused in [({"pid": int(dead), "host": here.host}, False),
                            ({"pid": os.getppid(), "host": here.host}, True),
                            ({"pid": 1, "host": "another-machine"}, True)]:
        (run_dir / ".lock").write_text(json.dumps({**holder, "command": "condcomp train",
                                                   "since": "yesterday"}))
        if refused:
            with pytest.raises(run_lock.RunLockedError, match="delete .*\\.lock"):
                RunLock(run_dir, log=quiet).__enter__()
        else:
            notes: list[str] = []
            with RunLock(run_dir, log=notes.append):
                assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
            assert "taking it over" in notes[0]


# ----------------------------------------------------------------------- the resume check


def test_resume_refuses_a_change_to_what_is_trained_unless_allowed(run_copy, corpus, capsys):
    args = train_args(corpus, run_copy, "--resume", "--set", "train.batch_size=8", steps=12)
    err = one_line_error(capsys, main(args))
    assert "train.batch_size 4 -> 8" in err and "--allow-change train.batch_size" in err
    assert "max_steps" not in err  # extending the run is harmless
    assert steps_by_kind(run_copy)["train"][-1] == 10  # nothing trained

    assert main(args + ["--allow-change", "train.batch_size"]) == 0
    saved = json.loads((run_copy / "config.json").read_text())
    assert saved["train"]["batch_size"] == 8 and saved["train"]["max_steps"] == 12
    (change,) = [r for r in read_metrics(run_copy) if r["kind"] == "config_change"]
    assert change["step"] == 10
    # (out_dir and data.cache_dir changed too: the run folder is a copy)
    assert {key: value for key, value in change["changes"].items() if "train." in key} == {
        "train.batch_size": [4, 8], "train.max_steps": [10, 12]}
    trains = [r for r in read_metrics(run_copy) if r["kind"] == "train"]
    assert [r["tokens"] for r in trains[-3:]] == [10 * 128, 10 * 128 + 256, 10 * 128 + 512]


@pytest.mark.parametrize("extra, message", [
    (["--set", "data.val_fraction=0.1", "--set", "model.n_layers=3"],
     "model.n_layers 2 -> 3, data.val_fraction 0.05 -> 0.1"),
    (["--set", "model.ffn.kind=moe"], "model.ffn.kind 'mlp' -> 'moe'"),
    (["--allow-change", "train.bach_size"], "--allow-change train.bach_size: no such config key"),
])
def test_resume_names_each_refused_change(run_copy, corpus, capsys, extra, message):
    err = one_line_error(capsys, main(train_args(corpus, run_copy, "--resume", *extra)))
    assert message in err


def test_resume_takes_only_a_checkpoint_of_its_own_run(trained, run_copy, corpus, capsys):
    other = list_checkpoints(trained[0])[0].path  # the same model, another run folder
    err = one_line_error(capsys, main(train_args(corpus, run_copy, "--resume", str(other),
                                                 steps=12)))
    assert f"not a checkpoint of {run_copy}" in err and "train.init_from" in err
    own = list_checkpoints(run_copy)[0].path
    assert main(train_args(corpus, run_copy, "--resume", str(own), steps=12)) == 0


def test_allow_change_needs_resume(run_copy, corpus, capsys):
    err = one_line_error(capsys, main(train_args(corpus, run_copy.parent / "new",
                                                 "--allow-change", "train.seed")))
    assert "add --resume" in err


def test_a_finished_suite_model_trained_with_other_values_is_not_resumed(tmp_path, capsys):
    from test_compare import write_suite

    suite = write_suite(tmp_path, '[[models]]\nname = "dense"\n', budget=1024)
    assert main(["compare", str(suite), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    code = main(["compare", str(suite), "--out", str(tmp_path / "out"), "--set", "train.seed=3"])
    err = one_line_error(capsys, code)
    assert "suite model 'dense'" in err and "train.seed 0 -> 3" in err and "delete" in err


# --------------------------------------------------------------------- metrics and leftovers


def test_a_cut_metrics_line_is_dropped_and_a_resume_never_repeats_a_step(run_copy, corpus,
                                                                         capsys):
    metrics = run_copy / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text[: len(text) - 25])  # the last row cut mid-JSON, as by a crash
    rows = read_metrics(run_copy)
    assert "left out line" in capsys.readouterr().err
    assert rows == [json.loads(line) for line in text.splitlines()[:-1]]

    assert main(train_args(corpus, run_copy, "--resume", steps=20)) == 0
    assert "left out line" in capsys.readouterr().out
    for line in metrics.read_text().splitlines():
        json.loads(line)  # every line whole again
    steps = steps_by_kind(run_copy)
    assert steps["train"] == list(range(1, 21)) and steps["eval"] == [20]


def test_rows_after_the_resumed_checkpoint_are_dropped(run_copy, corpus):
    five = next(c for c in list_checkpoints(run_copy) if c.step == 5)
    train(load_config("dense_tiny", tiny_overrides(corpus, run_copy.parent, "run", steps=10)),
          resume=five.path, log=quiet)
    steps = steps_by_kind(run_copy)
    assert steps["train"] == list(range(1, 11)) and steps["eval"] == [10]


def test_leftovers_of_interrupted_writes_are_removed_at_the_next_start(run_copy, corpus):
    leftover = run_copy / "checkpoints" / ".tmp-step_00000015-999999"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    (run_copy / ".metrics.jsonl.tmp-999999").write_text("half")
    notes: list[str] = []
    train(load_config("dense_tiny", tiny_overrides(corpus, run_copy.parent, "run", steps=10)),
          resume=True, log=notes.append)
    assert not leftover.exists() and not (run_copy / ".metrics.jsonl.tmp-999999").exists()
    assert any("removed 2 unfinished write(s)" in n for n in notes)


# ------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["../../escape", "", ".", "..", "a/b", "/abs"])
def test_a_suite_model_name_cannot_leave_the_output_folder(tmp_path, name):
    from test_compare import write_suite

    suite = write_suite(tmp_path, f'[[models]]\nname = {json.dumps(name)}\n')
    with pytest.raises(ConfigError, match="is not a folder name|needs a name") as err:
        load_suite(suite)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ['""', '"../x"', '"."'])
def test_a_run_name_cannot_make_runs_itself_or_leave_it(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--config", "dense_tiny", "--set", f"name={name}"])
    assert "is not a folder name" in one_line_error(capsys, code)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ file-system errors


def test_a_run_folder_that_cannot_exist_is_one_line(corpus, tmp_path, capsys):
    args = train_args(corpus, tmp_path / "run") + ["--set", 'out_dir="/dev/null/run"']
    err = one_line_error(capsys, main(args))
    assert "cannot create the run folder /dev/null/run: Not a directory" in err


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(corpus, tmp_path,
                                                                       monkeypatch):
    real = ckpt_lib.save_model
    calls = []

    def save_model(model, path):
        calls.append(path)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")
        real(model, path)

    monkeypatch.setattr(ckpt_lib, "save_model", save_model)
    cfg = load_config("dense_tiny", tiny_overrides(corpus, tmp_path, "full", steps=10))
    with pytest.raises(StorageError) as err:
        train(cfg, log=quiet)
    message = str(err.value)
    assert "cannot write checkpoint" in message and "step_00000010" in message
    assert "(the disk is full)" in message and "latest good checkpoint is" in message
    assert "step_00000005" in message and "\n" not in message
    (good,) = list_checkpoints(tmp_path / "full")
    ckpt_lib.verify_checkpoint(good)
    assert not [p for p in (tmp_path / "full" / "checkpoints").iterdir()
                if p.name.startswith(".tmp-")]


def test_a_full_disk_while_saving_the_training_state(run_copy, monkeypatch):
    import builtins

    class FullFile:
        def __init__(self, *args, **kwargs):
            self._file = builtins.open(*args, **kwargs)
            self._full = str(args[0]).endswith("state.pt") and "w" in str(args[1])

        def write(self, data):
            if self._full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._file.write(data)

        def __getattr__(self, name):
            return getattr(self._file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

    monkeypatch.setattr(ckpt_lib, "open", FullFile, raising=False)
    from condcomp.model import TransformerLM
    from condcomp.runs import read_config

    model = TransformerLM(read_config(run_copy).model)
    with pytest.raises(StorageError, match=r"step_00000011: No space left on device \(the disk "
                       r"is full\); the latest good checkpoint is .*step_00000010"):
        ckpt_lib.save_checkpoint(run_copy, 11, model, {"step": 11}, keep_last=10)
    assert [c.step for c in list_checkpoints(run_copy)] == [5, 10]
    assert not [p for p in (run_copy / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_no_permission_for_the_run_folder_is_one_line(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(run_lock.os, "open", denied)
    with pytest.raises(StorageError, match="cannot create the lock file .*: Permission denied; "
                       "make the run folder writable"):
        RunLock(tmp_path / "run", log=quiet).__enter__()


def test_a_full_disk_while_logging_is_one_line(corpus, tmp_path, monkeypatch, capsys):
    import condcomp.metrics_log as metrics_log_mod

    class Full:
        def __init__(self, *args, **kwargs):
            self.rows = 0

        def write(self, text):
            self.rows += 1
            if self.rows == 3:
                raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_log_mod, "open", Full, raising=False)
    err = one_line_error(capsys, main(train_args(corpus, tmp_path / "run")))
    assert "metrics.jsonl: No space left on device (the disk is full); free some disk" in err


# ----------------------------------------------------------------------- damaged run files


def test_a_checkpoint_of_another_model_says_so_in_one_line(trained, corpus, tmp_path, capsys):
    other = tmp_path / "wide"
    train(load_config("dense_tiny", tiny_overrides(corpus, tmp_path, "wide", steps=5)
                      + ["model.d_model=64"]), log=quiet)
    (ckpt,) = list_checkpoints(other)
    err = one_line_error(capsys, main(["eval", str(trained[0]), "--checkpoint", str(ckpt.path)]))
    assert "is of another model (it is not corrupt)" in err
    assert "checkpoint [64, 64], model [32, 32]" in err and "more" in err
    assert "corrupt:" not in err


@pytest.mark.parametrize("manifest", ["garbage", '{"format": 1, "step": "ten", "files": {}}',
                                      '{"format": 1, "step": 10, "files": []}'])
def test_a_damaged_manifest_named_on_the_command_line_is_one_line(run_copy, corpus, capsys,
                                                                 manifest):
    newest = list_checkpoints(run_copy)[-1].path
    (newest / "manifest.json").write_text(manifest)
    for args, flag in [(["eval", str(run_copy), "--checkpoint", str(newest)], "--checkpoint"),
                       (["generate", str(run_copy), "--prompt", "the", "--checkpoint",
                         str(newest)], "--checkpoint"),
                       (train_args(corpus, run_copy, "--resume", str(newest)), "--resume")]:
        err = one_line_error(capsys, main(args))
        assert "is corrupt: its manifest is unreadable" in err
        assert f"use the previous one with {flag} " in err and "step_00000005" in err


def test_a_truncated_config_json_is_one_line(run_copy, corpus, capsys):
    config = run_copy / "config.json"
    config.write_text(config.read_text()[:100])
    for args in (["eval", str(run_copy)], ["generate", str(run_copy), "--prompt", "the"],
                 train_args(corpus, run_copy, "--resume")):
        assert "config.json is damaged" in one_line_error(capsys, main(args))


# ------------------------------------------------------------------------------ prompts


def test_a_prompt_that_is_not_utf8_is_encoded_as_its_bytes(trained, capsys):
    # What Python makes of the command-line bytes b"the \xff quick" (PEP 383).
    prompt = b"the \xff quick".decode("utf-8", errors="surrogateescape")
    assert main(["generate", str(trained[0]), "--prompt", prompt, "--max-new-tokens", "5",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("the \ufffd quick")
