"""``lightning-dino benchmark`` on tiny recipes: its figures, the FLOP count against the networks'
own, the batch finder against a planted memory limit, and the bad inputs it names before work."""

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_dino import DINO, benchmark, cli
from tests.conftest import TINY_VIT

CONF = Path(__file__).parent / "conf"
FAST = ["--steps", "2", "--warmup", "1"]


def test_a_run_prints_positive_figures_for_dino_and_distillation(capsys):
    for recipe in ("tiny_vit.yaml", "tiny_distill.yaml"):
        (result,) = benchmark.main(["--config", str(CONF / recipe), *FAST], cli.train)
        assert result.batch_size == 8 and result.devices == 1
        assert result.images_per_second > 0 and result.step_seconds > 0
        assert result.peak_memory > 2**20 and result.flops_per_image > 0
    out = capsys.readouterr().out
    assert out.count("images/s") == 2 and "peak process memory" in out and "GFLOP/image" in out
    assert "MFU" not in out  # a CPU has no bf16 peak in the table


def test_flops_per_image_are_the_students_forward_and_backward_and_the_teachers_forward():
    """Counted network by network here; the teacher runs forward on the global crops only."""
    torch.manual_seed(0)
    model = DINO(**TINY_VIT)
    data = {"batch_size": 8, "global_crop_size": 32, "local_crop_size": 16, "n_local_crops": 2}
    counted = benchmark.flops_per_image(model, data, "32-true")
    globals_, locals_ = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)

    def flops(network, images, backward):
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
            out = network([images])
            if backward:
                out.sum().backward()
        return counter.get_total_flops()

    student = 2 * flops(model.student, globals_, True) + 2 * flops(model.student, locals_, True)
    teacher = 2 * flops(model.teacher, globals_, False)
    assert counted == pytest.approx((student + teacher) / 2, rel=0.01)  # two images
    forward = 2 * flops(model.student, globals_, False) + 2 * flops(model.student, locals_, False)
    assert 2.8 * forward < student <= 3 * forward  # backward: twice the forward, less the input grads
    checkpointed = DINO(**TINY_VIT, activation_checkpointing=True)
    assert benchmark.flops_per_image(checkpointed, data, "32-true") == pytest.approx(counted)  # no recompute
    assert checkpointed.student.backbone.grad_checkpointing  # switched back on after counting


def test_the_batch_finder_stops_at_a_planted_memory_limit(monkeypatch, capsys):
    batches = []
    built = benchmark.RandomCrops.__init__

    def remember(self, data, length):
        batches.append(int(data["batch_size"]))
        built(self, data, length)

    monkeypatch.setattr(benchmark.RandomCrops, "__init__", remember)
    monkeypatch.setattr(benchmark, "peak_memory", lambda device: batches[-1] * 2**30)  # 1 GiB per image
    results = benchmark.main(["--config", str(CONF / "tiny_vit.yaml"), *FAST, "--find-batch-size",
                              "--memory-limit-gib", "20", "--compare-checkpointing"], cli.train)
    assert [r.batch_size for r in results] == [8, 16, 16]  # 32 images would need 32 GiB
    out = capsys.readouterr().out
    assert "batch 32: does not fit (peak 32.00 GiB, above the limit)" in out
    assert "largest batch that fits: 16 per device" in out
    assert "activation checkpointing at batch 16: peak memory 16.00 -> 16.00 GiB (+0%)" in out


def test_a_batch_that_never_fits_is_named_with_the_fixes():
    with pytest.raises(benchmark.OutOfMemory, match=r"--data.batch_size=8 does not fit .*activation_checkpointing"):
        benchmark.main(["--config", str(CONF / "tiny_vit.yaml"), *FAST, "--memory-limit-gib", "0.001"], cli.train)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--config", "no_such_recipe"], "--config no_such_recipe: no such file or packaged recipe"),
        (["--config", str(CONF / "tiny_vit.yaml"), "--data.global_crop_size=30"],
         "--data.global_crop_size=30: the backbone cannot take 30x30 crops"),
    ],
)
def test_the_command_names_bad_input_before_any_step(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(benchmark.pl.Trainer, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["benchmark", *flags, *FAST])
    assert message in str(exit_.value)


def test_mfu_is_achieved_flops_per_device_over_the_peak(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert benchmark.peak_flops(cuda) == 989e12
    assert benchmark.peak_flops(torch.device("cpu")) is None
    assert benchmark.peak_flops(torch.device("cpu"), override_tflops=2.0) == 2e12
    # 2 devices, 2000 images/s together: 1000 images/s x 98.9 GFLOP on each, 10% of 989 TFLOP/s
    line = benchmark.Measurement(64, 2, 2000.0, 0.064, 3 * 2**30, 98.9e9, cuda).line(989e12)
    assert line.startswith("batch 64 x 2 devices: 2000.0 images/s, 64 ms/step, peak GPU memory 3.00 GiB")
    assert line.endswith("98.9 TFLOP/s per device, MFU 10.0%")


def test_crop_sizes_take_the_largest_row_of_a_size_mix():
    data = {"n_local_crops": 2, "crop_size_mix": [[256, 112, 0, 0.3], [512, 112, 1024, 0.7]]}
    assert benchmark.crop_sizes(data) == {"crops": [512, 512, 112, 112], "gram": [1024, 1024]}
