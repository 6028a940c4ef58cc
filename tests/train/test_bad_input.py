"""``python -m rmda_fused.train`` on bad input that must never cost data: divergence, a slim
export Torch-Pruning cannot do, a full disk, stale temporary checkpoints, a changed run on
--resume, a hung DDP process, unreadable images, and bad flags."""
import errno
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")
torchvision = pytest.importorskip("torchvision")

from rmda_fused.datasets import write_digits_imagefolder  # noqa: E402
from rmda_fused.train import checkpoint, loop, run  # noqa: E402

DIGITS = ["--preset", "digits", "--quiet"]
# the cheapest torchvision model to train here; Torch-Pruning cannot trace its channel shuffle
SHUFFLENET = "shufflenet_v2_x0_5"


def _exit_message(error: pytest.ExceptionInfo, capsys) -> str:
    """What a SystemExit shows the user: its message, or what argparse printed."""
    code = error.value.code
    return code if isinstance(code, str) else capsys.readouterr().err


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _assert_finite_checkpoint(out, before_epoch: int) -> None:
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] < before_epoch
    tensors = list(state["model"].values())
    tensors += [t for s in state["optimizer"]["state"].values() for t in s.values()
                if torch.is_tensor(t) and t.is_floating_point()]
    assert all(t.isfinite().all() for t in tensors)


@pytest.fixture
def small_tree(tmp_path):
    """The digits as an ImageFolder of PNGs: 2 training and 1 validation image per class."""
    return write_digits_imagefolder(tmp_path / "tree", 2, 1)


def _imagefolder_flags(tree, out) -> list[str]:
    return ["--data", str(tree), "--arch", SHUFFLENET, "--device", "cpu", "--image-size", "16",
            "--epochs", "1", "--batch-size", "7", "--workers", "0", "--threads", "1", "--quiet",
            "--output", str(out)]


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_epoch = loop.train_epoch
    epochs = []

    def epoch_that_breaks_in_the_second(args, info, model, *rest):
        stats = real_epoch(args, info, model, *rest)
        epochs.append(stats)
        if len(epochs) == 2:
            with torch.no_grad():
                next(model.parameters())[0] = math.nan
        return stats

    monkeypatch.setattr(loop, "train_epoch", epoch_that_breaks_in_the_second)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as error:
        run(DIGITS + ["--epochs", "3", "--output", str(out)])
    assert "diverged in epoch 2" in str(error.value.code) and "0.weight" in str(error.value.code)
    _assert_finite_checkpoint(out, before_epoch=2)
    final = json.loads((out / "final.json").read_text())
    assert final["diverged"] and final["last_good_epoch"] == 1
    assert not {"accuracy", "sparsity_z", "sparsity_W", "last_change"} & set(final)
    last = _records(out)[-1]
    assert last["diverged"] and "sparsity_z" not in last
    assert not (out / "model_final.pt").exists()


def test_a_huge_lr_exits_non_zero_and_reports_no_result(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as error:
        run(DIGITS + ["--epochs", "2", "--lr", "1e6", "--output", str(out)])
    assert "diverged" in str(error.value.code)
    final = json.loads((out / "final.json").read_text())
    assert final["diverged"] and "sparsity_z" not in final
    if (out / "checkpoint.pt").exists():
        _assert_finite_checkpoint(out, before_epoch=final["epoch"])


def test_a_failed_slim_export_keeps_the_training_outputs(small_tree, tmp_path):
    pytest.importorskip("torch_pruning")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as error:
        run(_imagefolder_flags(small_tree, out) + ["--export-slim"])
    message = str(error.value.code)
    assert f"--arch {SHUFFLENET}" in message and "Torch-Pruning" in message
    for name in ("checkpoint.pt", "model_final.pt", "log.jsonl"):
        assert (out / name).stat().st_size > 0
    final = json.loads((out / "final.json").read_text())
    assert "accuracy" in final and "Torch-Pruning" in final["slim_error"]
    assert not (out / "slim.pt").exists()


def test_a_full_disk_names_the_checkpoint_and_the_free_space(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"epoch": 1})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    with pytest.raises(SystemExit) as error:
        checkpoint.save(tmp_path, {"epoch": 2, "weights": torch.zeros(1000)})
    message = str(error.value.code)
    assert str(checkpoint.path(tmp_path)) in message and "MiB free" in message
    assert os.strerror(errno.ENOSPC) in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no partial file
    assert torch.load(checkpoint.path(tmp_path))["epoch"] == 1


def test_stale_temporary_checkpoints_are_removed(tmp_path):
    out = tmp_path / "run"
    flags = DIGITS + ["--epochs", "1", "--output", str(out)]
    run(flags)
    stale = out / f".{checkpoint.FILENAME}.999999.tmp"  # as a kill during a save leaves it
    stale.write_bytes(b"partial")
    run(flags + ["--resume"])  # at the start of a run
    assert not stale.exists()
    stale.write_bytes(b"partial")
    checkpoint.save(out, {"epoch": 1})  # after a save
    assert not stale.exists()


def test_resume_takes_the_data_folder_however_it_is_spelled(small_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(small_tree.parent)
    out = tmp_path / "run"
    flags = _imagefolder_flags(small_tree, out)
    data = flags.index("--data") + 1
    flags[data] = f"./{small_tree.name}"
    run(flags)
    flags[data] = f"{small_tree.name}/"
    run(flags + ["--resume", "--epochs", "2"])
    assert [r["epoch"] for r in _records(out)] == [1, 2]


def test_resume_refuses_a_changed_hyper_parameter_in_one_line(tmp_path):
    out = ["--output", str(tmp_path / "run")]
    run(DIGITS + ["--epochs", "1"] + out)
    with pytest.raises(SystemExit) as error:
        run(DIGITS + ["--epochs", "2", "--resume", "--lam", "0.5", "--lr", "0.5"] + out)
    message = str(error.value.code)
    assert "--lam" in message and "--lr" in message and "\n" not in message
    assert "accuracy" in run(DIGITS + ["--epochs", "2", "--resume"] + out)  # --epochs may change


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_hung_process_ends_the_job_after_timeout_min(monkeypatch):
    env = dict(WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    # rank 1 joins the process group, then hangs: it never reaches a collective
    hung = subprocess.Popen(
        [sys.executable, "-c", "import datetime, time, torch.distributed as d; print(flush=True); "
         "d.init_process_group('gloo', timeout=datetime.timedelta(minutes=1)); time.sleep(120)"],
        env={**os.environ, **env, "RANK": "1"}, stdout=subprocess.PIPE, text=True)
    try:
        hung.stdout.readline()  # torch imported: it joins as soon as rank 0 listens
        for key, value in {**env, "RANK": "0"}.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(SystemExit) as error:
            run(DIGITS + ["--epochs", "1", "--timeout-min", "0.05"])
        message = str(error.value.code)
        assert message.startswith("rank 0:") and "--timeout-min 0.05" in message
    finally:
        hung.kill()
        hung.wait()


def test_unreadable_images_are_left_out_with_a_warning_or_stop_the_run(small_tree, tmp_path):
    bad = small_tree / "train" / "0" / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "run"
    # 21 training images in batches of 7: every one of them is read in the epoch
    with pytest.warns(RuntimeWarning, match="bad.png"):
        final = run(_imagefolder_flags(small_tree, out))
    assert _records(out)[-1]["unreadable_images"] == 1 and final["unreadable_images"] == 0
    with pytest.raises(SystemExit) as error:
        run(_imagefolder_flags(small_tree, tmp_path / "strict") + ["--strict-data"])
    assert str(bad) in str(error.value.code)


@pytest.mark.parametrize("flags, expected", [
    (["--output", "{file}/run"], "--output"),
    (["--output", "{file}"], "--output"),
    (["--lr", "-1"], "--lr"),
    (["--lam", "nan"], "--lam"),
    (["--momentum", "0"], "momentum"),
    (["--arch", "resnet18"], "--preset digits"),
    (["--fsdp", "--channels-last"], "--channels-last"),
])
def test_command_line_errors_are_one_line(tmp_path, capsys, flags, expected):
    file = tmp_path / "a-file"
    file.write_text("")
    with pytest.raises(SystemExit) as error:
        run(DIGITS + ["--epochs", "1"] + [f.format(file=file) for f in flags])
    message = _exit_message(error, capsys)
    assert expected in message and message.strip().count("\n") == 0
    assert error.value.code not in (0, None)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SystemExit) as error:
        run(DIGITS + ["--epochs", "1", "--output", str(locked / "run")])
    assert "--output" in str(error.value.code)


@pytest.mark.parametrize("first, then", [([], ["--fsdp"]), (["--fsdp"], [])])
def test_resume_refuses_the_other_kind_of_checkpoint_in_one_line(tmp_path, first, then):
    """A checkpoint.pt holds whole tensors, a --fsdp checkpoint.dcp shards: neither run
    resumes the other's, and the refusal leaves the checkpoint as it was."""
    out = ["--output", str(tmp_path / "run")]
    run(DIGITS + ["--epochs", "1"] + first + out)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(SystemExit) as error:
        run(DIGITS + ["--epochs", "2", "--resume"] + then + out)
    message = str(error.value.code)
    assert "--fsdp" in message and "\n" not in message
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_an_interrupted_sharded_checkpoint_swap_is_undone(tmp_path):
    """A --fsdp run killed between renaming the old checkpoint directory away and the new
    one into place: the next run takes the old one back; a partial new one is removed."""
    from rmda_fused.train import sharded_checkpoint

    out = tmp_path / "run"
    flags = DIGITS + ["--epochs", "1", "--fsdp", "--output", str(out)]
    run(flags)
    final = sharded_checkpoint.path(out)
    os.replace(final, out / f".{sharded_checkpoint.DIRNAME}.old")
    (out / f".{sharded_checkpoint.DIRNAME}.tmp").mkdir()  # a write cut short
    run(flags + ["--resume", "--epochs", "2"])
    assert [r["epoch"] for r in _records(out)] == [1, 2]
    assert sorted(p.name for p in out.glob("*checkpoint*")) == [sharded_checkpoint.DIRNAME]
    assert torch.load(final / sharded_checkpoint.RUN_FILE, weights_only=False)["epoch"] == 2


def test_a_full_disk_or_a_damaged_sharded_checkpoint_is_one_line(tmp_path, monkeypatch):
    """--fsdp: a save that fails (here the disk fills in epoch 2) keeps the previous epoch's
    directory and leaves no temporary; a directory missing its shards is not resumed."""
    from rmda_fused.train import sharded_checkpoint

    real_save, real_fsync = sharded_checkpoint.save, os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save_filling_the_disk(args, info, epoch, *rest):
        if epoch == 2:
            monkeypatch.setattr(os, "fsync", disk_full)
        try:
            return real_save(args, info, epoch, *rest)
        finally:
            monkeypatch.setattr(os, "fsync", real_fsync)

    monkeypatch.setattr(sharded_checkpoint, "save", save_filling_the_disk)
    out = tmp_path / "run"
    flags = DIGITS + ["--epochs", "2", "--fsdp", "--output", str(out)]
    with pytest.raises(SystemExit) as error:
        run(flags)
    message = str(error.value.code)
    final = sharded_checkpoint.path(out)
    assert str(final) in message and "MiB free" in message and "\n" not in message
    assert os.strerror(errno.ENOSPC) in message and "keeps the previous epoch" in message
    assert sorted(p.name for p in out.glob("*checkpoint*")) == [sharded_checkpoint.DIRNAME]
    assert torch.load(final / sharded_checkpoint.RUN_FILE, weights_only=False)["epoch"] == 1

    for shard in final.glob("*.distcp"):
        shard.unlink()
    with pytest.raises(SystemExit) as error:
        run(flags + ["--resume"])
    message = str(error.value.code)
    assert "cannot read" in message and str(final) in message and "\n" not in message
