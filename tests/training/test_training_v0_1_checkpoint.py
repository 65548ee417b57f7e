"""A checkpoint written by lightning_dino 0.1.0 (before the package was organised by concern,
with iBOT, KoLeo and Gram anchoring on) loads, resumes to the same end as the uninterrupted 0.1.0
run, and exports. How the fixture was made: tests/fixtures/README.md."""

import shutil

import pytest
import torch

from lightning_dino import DINO, export_backbone, load_backbone
from lightning_dino.training.resume import check_resume
from tests.conftest import make_trainer
from tests.training.test_training_resume import CONF, dump, finish, start

FIXTURES = CONF.parent / "fixtures"
CHECKPOINT = FIXTURES / "v0_1_0_tiny_vit_step6.ckpt"
FINAL = FIXTURES / "v0_1_0_tiny_vit_final.pt"
RUN = [
    "fit", "--config", str(CONF / "tiny_vit.yaml"), "--seed_everything=0",
    "--data.synthetic_size=16", "--data.batch_size=4", "--trainer.max_epochs=3",
    "--trainer.log_every_n_steps=1", "--model.lr=0.2", "--model.momentum_teacher=0.9",
    "--model.warmup_epochs=1", "--model.warmup_teacher_temp=0.02", "--model.teacher_temp=0.05",
    "--model.warmup_teacher_temp_epochs=2", "--model.drop_path_rate=0.1",
    "--checkpoint.last_every_n_train_steps=3", "--model.ibot_loss_weight=1.0",
    "--model.koleo_loss_weight=0.1", "--model.gram_loss_weight=1.0", "--model.gram_start_step=2",
    "--model.gram_update_every=4",
]
# 0.1 zeroed negative Gram similarities; today's default anchors them (DINOv3's configs).
AS_TRAINED = ["--model.gram_remove_negatives=true"]


def test_loads_with_every_weight_and_centre_under_its_new_name():
    saved = torch.load(CHECKPOINT, weights_only=True)["state_dict"]
    assert "ibot.center" in saved and any(k.startswith("gram_teacher.") for k in saved)
    model = DINO.load_from_checkpoint(CHECKPOINT)  # strict: every key is used, none missing
    state = model.state_dict()
    assert torch.equal(state["ibot.loss.center"], saved["ibot.center"])
    assert torch.count_nonzero(saved["ibot.center"]) > 0
    for key, value in saved.items():
        new = key.replace("gram_teacher.", "gram.teacher.").replace("ibot.center", "ibot.loss.center")
        assert torch.equal(state[new], value), key
    assert [term.name for term in model.terms] == ["koleo", "ibot", "gram"]


def test_resuming_a_0_1_gram_run_warns_that_negatives_are_now_anchored():
    model = DINO.load_from_checkpoint(CHECKPOINT)
    model.trainer = make_trainer()
    with pytest.warns(UserWarning, match=r"zeroed negative patch similarities.*gram_remove_negatives=True"):
        check_resume(model, torch.load(CHECKPOINT, weights_only=True))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resumes_to_the_end_of_the_uninterrupted_0_1_run(tmp_path):
    checkpoint = tmp_path / "v0_1.ckpt"
    shutil.copy(CHECKPOINT, checkpoint)
    finish(start([*RUN, *AS_TRAINED, *dump(tmp_path / "out"), "--ckpt_path", str(checkpoint)], cwd=tmp_path))
    got = torch.load(tmp_path / "out" / "rank0.pt", weights_only=True)
    want = torch.load(FINAL, weights_only=True)
    assert got["global_step"] == want["global_step"] == 12
    assert [row["step"] for row in got["rows"]] == list(range(7, 13))  # steps 7..12, once each
    # The fixture may come from another CPU than the one running the test, where float kernels
    # round differently: close, not bit-equal. A wrong resume (a replayed or skipped batch, a
    # centre or Gram teacher not restored) moves these by far more (lr 0.2, momentum 0.9).
    losses = torch.stack([row["loss"] for row in got["rows"]])
    torch.testing.assert_close(losses, want["losses"][6:], rtol=1e-4, atol=1e-5)
    for key in ("student", "teacher"):
        for name, value in want[key].items():
            mine = got[key][name]
            if name.endswith("attn.qkv.bias"):
                # The key bias adds q.b to every logit of a query's softmax, which cancels: its
                # gradient is zero but for rounding, and AdamW scales that noise up to full steps,
                # so it differs between CPUs. Compare the query and value biases only.
                width = len(value) // 3
                mine, value = torch.cat([mine[:width], mine[2 * width:]]), torch.cat([value[:width], value[2 * width:]])
            torch.testing.assert_close(mine, value, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    torch.testing.assert_close(got["center"], want["center"], rtol=1e-4, atol=1e-5)


def test_exports_the_teacher_backbone(tmp_path):
    export_backbone(CHECKPOINT, tmp_path / "export")
    backbone = load_backbone(tmp_path / "export").eval()
    model = DINO.load_from_checkpoint(CHECKPOINT).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), model(images))
