"""``python -m rmda_fused.train``: DDP on CPU, checkpoint/resume, bad input, slim export."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")
torchvision = pytest.importorskip("torchvision")

from rmda_fused.datasets import write_digits_imagefolder  # noqa: E402
from rmda_fused.train import run  # noqa: E402

DIGITS = ["--preset", "digits", "--quiet"]


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    """The digits as an ImageFolder of PNGs: 20 training and 5 validation images per class."""
    return write_digits_imagefolder(tmp_path_factory.mktemp("tree"), 20, 5)


def _train(*args, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "-m", "rmda_fused.train", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_two_process_ddp_run_resumes_and_exports_slim(tiny_tree, tmp_path):
    pytest.importorskip("torch_pruning")
    out = tmp_path / "run"
    flags = ["--data", tiny_tree, "--device", "cpu", "--arch", "resnet18", "--image-size", 32,
             "--epochs", 3, "--milestones", 1, "--batch-size", 32, "--lr", 0.1, "--lam", 0.2,
             "--workers", 0, "--threads", 1, "--output", out]
    # 200 images / 32 per step = 6 steps an epoch: stopped in epoch 2, as if killed
    first = _train(*flags, "--stop-after-steps", 9)
    assert first.returncode == 0, first.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    resumed = _train(*flags, "--resume", "--export-slim")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "after epoch 1" in resumed.stdout

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[1]["momentum"] == 1.0  # the restart after epoch 1 was restored (c / 0.1)
    assert {"val_top1", "val_top5", "sparsity_z", "sparsity_W", "images_per_s", "optimizer_share",
            "flips", "last_change"} <= set(log[-1])
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 3 and state["world_size"] == 2 and len(state["rng"]) == 2
    final = json.loads((out / "final.json").read_text())
    assert final["sparsity_z"] == final["sparsity_W"] > 0
    for name in ("accuracy.png", "sparsity.png", "model_final.pt", "slim.pt"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "slim.pt.json").read_text())
    assert report["max_abs_diff"] <= 1e-4 * max(1.0, report["max_abs_output"])
    assert report["params_after"] < report["params_before"]
    assert report["macs_after"] < report["macs_before"]


@pytest.mark.parametrize("extra", [["--epochs", "4"], ["--epochs", "3", "--fsdp"]],
                         ids=["plain", "one_process_fsdp"])
def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, extra):
    flags = DIGITS + ["--milestones", "2", *extra]
    straight = run(flags + ["--output", str(tmp_path / "a")])
    # 23 steps an epoch: stopped in epoch 2, before the restart
    assert run(flags + ["--output", str(tmp_path / "b"), "--stop-after-steps", "30"])["stopped"]
    resumed = run(flags + ["--output", str(tmp_path / "b"), "--resume"])
    straight.pop("seconds"), resumed.pop("seconds")
    assert resumed == straight
    a = torch.load(tmp_path / "a" / "model_final.pt")["model"]
    b = torch.load(tmp_path / "b" / "model_final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags", [
    ["--optimizer", "proxsgd"], ["--optimizer", "sgd"], ["--channels-last"], ["--amp", "bf16"],
    ["--momentum-schedule", "sqrt"],
])
def test_variants_train(flags):
    final = run(DIGITS + ["--epochs", "2", "--milestones", "1", *flags])
    assert 0.0 <= final["accuracy"] <= 1.0 and final["accuracy"] > 0.2


def _layout(tmp_path, kind):
    root = tmp_path / "data"
    if kind == "empty":
        root.mkdir()
    elif kind == "no_val":
        (root / "train" / "cat").mkdir(parents=True)
    elif kind == "no_classes":
        (root / "train").mkdir(parents=True), (root / "val").mkdir()
    elif kind == "no_images":
        (root / "train" / "cat").mkdir(parents=True), (root / "val" / "cat").mkdir(parents=True)
    return root


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such directory"), ("empty", "is empty"), ("no_val", "no val/ folder"),
    ("no_classes", "holds no class folders"), ("no_images", "cat"),
])
def test_bad_data_is_a_clear_error(tmp_path, kind, message):
    root = _layout(tmp_path, kind)
    with pytest.raises(SystemExit) as error:
        run(["--data", str(root), "--device", "cpu", "--arch", "resnet18", "--quiet"])
    assert message in str(error.value.code)


def test_unknown_arch_names_close_matches():
    with pytest.raises(SystemExit) as error:
        run(["--data", "unused", "--arch", "resnet19"])
    assert "resnet18" in str(error.value.code) and "not a torchvision" in str(error.value.code)


def test_resume_of_another_run_or_without_resume(tmp_path):
    out = ["--output", str(tmp_path / "run")]
    run(DIGITS + ["--epochs", "1"] + out)
    with pytest.raises(SystemExit) as error:
        run(DIGITS + ["--epochs", "2", "--grouping", "output_channel", "--resume"] + out)
    assert "--grouping input_channel" in str(error.value.code)
    with pytest.raises(SystemExit) as error:
        run(DIGITS + ["--epochs", "2"] + out)
    assert "--resume" in str(error.value.code)


def test_command_line_error_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rmda_fused.train", "--data", str(tmp_path / "nope"),
                             "--device", "cpu", "--arch", "resnet18"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no such directory" in result.stderr and "Traceback" not in result.stderr


def test_run_stays_callable_after_a_run():
    """``rmda_fused.train.run`` is the function, before and after a run (no submodule of that
    name replaces it on import)."""
    import rmda_fused.train as train

    for _ in range(2):
        assert callable(train.run) and not isinstance(train.run, type(os))
        assert "accuracy" in train.run(DIGITS + ["--epochs", "1"])


def _resnet_flags(tree, out, *more):
    return ["--data", tree, "--device", "cpu", "--arch", "resnet18", "--image-size", 32,
            "--epochs", 3, "--milestones", 1, "--batch-size", 32, "--lr", 0.1, "--lam", 0.2,
            "--workers", 0, "--threads", 1, "--output", out, "--quiet", *more]


def _slim_report(out) -> dict:
    report = json.loads((out / "slim.pt.json").read_text())
    assert report["max_abs_diff"] <= 1e-4 * max(1.0, report["max_abs_output"])
    return report


def test_two_process_fsdp_coupled_run_resumes_and_exports_slim(tiny_tree, tmp_path):
    """--fsdp with coupled groups (traced before sharding): stopped in epoch 2, resumed from
    the DCP directory, and exported from the gathered full state."""
    pytest.importorskip("torch_pruning")
    out = tmp_path / "run"
    flags = _resnet_flags(tiny_tree, out, "--fsdp", "--grouping", "coupled")
    first = _train(*flags, "--stop-after-steps", 9)  # 6 steps an epoch
    assert first.returncode == 0, first.stderr
    assert not (out / "checkpoint.pt").exists()
    saved = torch.load(out / "checkpoint.dcp" / "run.pt", weights_only=False)
    assert saved["epoch"] == 1 and saved["world_size"] == 2
    assert {p.name for p in (out / "checkpoint.dcp").iterdir()} >= {".metadata", "run.pt"}
    resumed = _train(*flags, "--resume", "--export-slim")
    assert resumed.returncode == 0, resumed.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[1]["momentum"] == 1.0  # the scheduler's restart after epoch 1 was restored
    assert torch.load(out / "checkpoint.dcp" / "run.pt", weights_only=False)["epoch"] == 3
    assert not list(out.glob(".checkpoint*"))  # no temporaries left
    final = json.loads((out / "final.json").read_text())
    assert final["sparsity_z"] == final["sparsity_W"] > 0
    whole = torch.load(out / "model_final.pt")["model"]  # gathered: full shapes, plain tensors
    assert whole["conv1.weight"].shape == (64, 3, 7, 7) and type(whole["fc.bias"]) is torch.Tensor
    report = _slim_report(out)
    assert report["params_after"] < report["params_before"]


def test_two_process_fsdp_checkpoint_resumes_on_one_process(tmp_path, monkeypatch):
    """DCP reshards the 2-process checkpoint onto 1 process: the model and optimizer state
    after restoring are those saved (read back independently with dcp_to_torch_save), and
    the run continues at the next epoch with the scheduler where it was."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from rmda_fused.train import fsdp, sharded_checkpoint

    out = tmp_path / "run"
    flags = DIGITS + ["--epochs", "2", "--milestones", "1", "--lam", "0.01", "--fsdp",
                      "--output", out]
    first = _train(*flags, "--stop-after-steps", 30)  # 23 steps an epoch on 2 processes
    assert first.returncode == 0, first.stderr
    dcp_to_torch_save(out / "checkpoint.dcp", tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)

    restored = {}
    real_restore = sharded_checkpoint.restore

    def restore_and_look(state, info, model, optimizer, *rest):
        restored["epoch"] = real_restore(state, info, model, optimizer, *rest)
        # copies: on one process the gathered tensors may be the parameters themselves
        restored["model"] = copy.deepcopy(fsdp.full_model_state(model))
        restored["optimizer"] = copy.deepcopy(get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
        return restored["epoch"]

    monkeypatch.setattr(sharded_checkpoint, "restore", restore_and_look)
    final = run([str(a) for a in flags] + ["--resume"])
    assert restored["epoch"] == 1
    assert restored["model"].keys() == saved["model"].keys()
    assert all(torch.equal(restored["model"][k], saved["model"][k]) for k in saved["model"])
    state, saved_state = restored["optimizer"]["state"], saved["optimizer"]["state"]
    assert state.keys() == saved_state.keys() and state
    for name, entries in saved_state.items():
        assert entries.keys() == state[name].keys() and "dual" in entries
        assert all(torch.equal(state[name][k], v) for k, v in entries.items() if torch.is_tensor(v))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[1]["momentum"] == 1.0
    assert torch.load(out / "checkpoint.dcp" / "run.pt", weights_only=False)["world_size"] == 1
    assert 0.0 <= final["accuracy"] <= 1.0


def test_two_process_ddp_coupled_run_exports_a_slimmer_model(tiny_tree, tmp_path):
    pytest.importorskip("torch_pruning")
    out = tmp_path / "run"
    result = _train(*_resnet_flags(tiny_tree, out, "--grouping", "coupled",
                                   "--export-slim"))
    assert result.returncode == 0, result.stderr
    report = _slim_report(out)
    assert report["candidates"]["slim"]["removed_channels"] > 0
    assert report["params_after"] < report["params_before"]
