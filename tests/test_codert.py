"""CoDERT pieces: encoder logits, the frame KL against hand computations, frame-rate alignment, and what each
mode trains (static: nothing of the teacher; tandem: the teacher on its own loss only; shared: one predictor and
one joiner for both encoders)."""

import copy
import math

import pytest
import torch
from torch import nn

from speechkd.config import ModelConfig, kd_settings
from speechkd.methods.codert import CodertKD, align_teacher_logits
from speechkd.models.build import build_model
from speechkd.models.transducer import Decoder, Joiner
from speechkd.training import KDContext

V = 7
TOKENS = [[2, 3], [4]]


def _model(dim=16, subsampling=2, ctc_head=True, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=dim, num_layers=1, num_heads=2, ff_dim=32, decoder_dim=16, joiner_dim=16, dropout=0.0,
                      subsampling=subsampling, ctc_head=ctc_head)
    return build_model(cfg, vocab_size=V)


def _batch():
    torch.manual_seed(123)
    return {"features": torch.randn(2, 30, 80), "feature_lens": torch.tensor([30, 22]), "tokens": TOKENS}


def _targets():
    y = torch.tensor([[2, 3], [4, 0]])
    return y, torch.tensor([2, 1])


def _hand_probs(joiner, enc, T):
    """softmax(output_linear(tanh(encoder_proj(enc))) / T) written out with the weight matrices."""
    h = torch.tanh(enc @ joiner.encoder_proj.weight.T + joiner.encoder_proj.bias)
    z = h @ joiner.output_linear.weight.T + joiner.output_linear.bias
    e = torch.exp(z / T - (z / T).max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)  # (N, T, V)


def test_encoder_logits_shape_and_equal_joiner_without_predictor():
    model = _model()
    torch.manual_seed(1)
    enc = torch.randn(2, 5, 16)
    logits = model.encoder_logits(enc)
    assert logits.shape == (2, 5, V)
    y, y_lens = _targets()
    dec = model.decoder(model.decoder_input(y, y_lens))  # (N, U+1, D)
    full = model.joiner(enc[:, :, None], dec[:, None])  # (N, T, U+1, V)
    assert not torch.allclose(full[:, :, 1], logits, atol=1e-4)  # the predictor counts...
    with torch.no_grad():
        model.joiner.decoder_proj.weight.zero_()
        model.joiner.decoder_proj.bias.zero_()
    full = model.joiner(enc[:, :, None], dec[:, None])
    for u in range(full.shape[2]):  # ...and without it the joiner gives the encoder logits at every u
        assert torch.allclose(full[:, :, u], logits, atol=1e-6)
    with pytest.raises(ValueError):
        model.encoder_logits(torch.randn(2, 5, 15))


@pytest.mark.parametrize("ratio", [1, 2])
def test_static_kl_equals_hand_computation(ratio):
    """loss = scale * T^2 * sum_n sum_{j < min(len_s, len_t // r)} KL(mean_k p_t[r j + k] || p_s[j]) / N."""
    student = _model(subsampling=2).eval()
    teacher = _model(dim=24, subsampling=2 // ratio, seed=1).eval()
    batch = _batch()
    enc, enc_lens, layers = student.encode(batch["features"], batch["feature_lens"])
    scale, T = 0.7, 2.0
    kd = CodertKD("static", teacher, scale=scale, temperature=T, frame_ratio=ratio)
    loss, logs = kd(batch, enc, enc_lens, layers, KDContext(student, None))
    with torch.no_grad():
        t_enc, t_lens, _ = teacher.encode(batch["features"], batch["feature_lens"])
        p_t = _hand_probs(teacher.joiner, t_enc, T)
        p_s = _hand_probs(student.joiner, enc, T)
    hand = 0.0
    for n in range(2):
        valid = min(int(enc_lens[n]), int(t_lens[n]) // ratio)
        assert valid >= 5
        for j in range(valid):
            target = sum(p_t[n, ratio * j + k] for k in range(ratio)) / ratio
            hand += float((target * (target.log() - p_s[n, j].log())).sum())
    hand = T * T * hand / 2
    assert logs["codert_kl"] == pytest.approx(hand, rel=1e-4)
    assert loss.item() == pytest.approx(scale * hand, rel=1e-4)
    assert set(logs) == {"codert_kl"}


def test_kl_zero_for_equal_models_positive_otherwise_and_ignores_padding():
    student = _model().eval()
    batch = _batch()
    enc, enc_lens, layers = student.encode(batch["features"], batch["feature_lens"])
    ctx = KDContext(student, None)
    same = CodertKD("static", copy.deepcopy(student))
    assert same(batch, enc, enc_lens, layers, ctx)[1]["codert_kl"] == pytest.approx(0.0, abs=1e-6)
    kd = CodertKD("static", _model(seed=1))
    loss, logs = kd(batch, enc, enc_lens, layers, ctx)
    assert logs["codert_kl"] > 1e-3
    assert int(enc_lens[1]) < enc.shape[1]
    enc2 = enc.detach().clone()
    enc2[1, int(enc_lens[1]):] = 100.0  # frames beyond encoder_out_lens change nothing
    loss2, _ = kd(batch, enc2, enc_lens, layers, ctx)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    enc3 = enc.detach().clone()
    enc3[1, int(enc_lens[1]) - 1] += 1.0  # a valid frame does
    assert kd(batch, enc3, enc_lens, layers, ctx)[0].item() != pytest.approx(loss.item(), rel=1e-6)
    # frames past the teacher's length do not count either: the KL runs to min(student, teacher) lengths
    frames, t_lens, heads = kd.teacher_frames(batch["features"], batch["feature_lens"], student)
    assert t_lens.tolist() == enc_lens.tolist() == [14, 10]
    short = torch.tensor([14, 6])
    kl_short_teacher = kd.encoder_kl(enc, enc_lens, frames, short, heads, student)
    kl_short_student = kd.encoder_kl(enc, short, frames, t_lens, heads, student)
    assert kl_short_teacher.item() == pytest.approx(kl_short_student.item(), rel=1e-6)
    assert kl_short_teacher.item() < logs["codert_kl"] - 1e-4


def test_static_teacher_frozen_unregistered_and_without_gradient():
    student, teacher = _model(), _model(dim=24, seed=1)
    kd = CodertKD("static", teacher)
    assert list(kd.parameters()) == [] and len(kd.state_dict()) == 0
    assert kd.frozen_teacher is teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    kd.train()
    assert not teacher.training  # the trainer's .train() does not reach it
    batch = _batch()
    enc, enc_lens, layers = student.encode(batch["features"], batch["feature_lens"])
    loss, _ = kd(batch, enc, enc_lens, layers, KDContext(student, None))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.encoder.parameters())


def test_tandem_teacher_trains_on_its_own_loss_only():
    student, teacher = _model(), _model(dim=24, seed=1)
    kd = CodertKD("tandem", teacher, scale=1.0, temperature=1.0, ctc_weight=0.5)
    t_params = list(teacher.parameters())
    assert {id(p) for p in kd.parameters()} == {id(p) for p in t_params}  # registered: trained, checkpointed
    assert all(k.startswith("teacher.") for k in kd.state_dict())
    batch = _batch()
    enc, enc_lens, layers = student.encode(batch["features"], batch["feature_lens"])
    loss, logs = kd(batch, enc, enc_lens, layers, KDContext(student, None))
    # the teacher's own loss, computed apart: mean RNN-T + ctc_weight * mean CTC on the references
    y, y_lens = _targets()
    t_enc, t_lens, _ = teacher.encode(batch["features"], batch["feature_lens"])
    rnnt = teacher.sequence_loss(t_enc, t_lens, y, y_lens, reduction="none").mean()
    ctc = teacher.ctc_loss(t_enc, t_lens, y, y_lens, reduction="none").mean()
    own = rnnt + 0.5 * ctc
    assert logs["teacher_rnnt"] == pytest.approx(rnnt.item(), rel=1e-5)
    assert logs["teacher_ctc"] == pytest.approx(ctc.item(), rel=1e-5)
    assert loss.item() == pytest.approx(own.item() + logs["codert_kl"], rel=1e-5) and logs["codert_kl"] > 1e-3
    # the KD term alone (forward's own pieces): gradient into the student, none into the teacher
    frames, lens, heads = kd.teacher_frames(batch["features"], batch["feature_lens"], student)
    assert heads is teacher
    kl = kd.encoder_kl(enc, enc_lens, frames, lens, heads, student)
    assert kl.item() == pytest.approx(logs["codert_kl"], rel=1e-5)
    grads = torch.autograd.grad(kl, t_params + [enc], retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads[:-1])
    assert grads[-1].abs().sum() > 0
    # the whole forward loss gives the teacher exactly the gradient of its own loss
    full = torch.autograd.grad(loss, t_params, retain_graph=True, allow_unused=True)
    own_grads = torch.autograd.grad(own, t_params, allow_unused=True)
    grad_of = {id(p): g for p, g in zip(t_params, own_grads)}
    for part in (teacher.encoder, teacher.decoder, teacher.joiner, teacher.ctc_output):
        assert all(grad_of[id(p)] is not None for p in part.parameters())
        assert any(grad_of[id(p)].abs().sum() > 0 for p in part.parameters()), part
    for g_full, g_own in zip(full, own_grads):
        assert torch.allclose(g_full, g_own, rtol=1e-4, atol=1e-7)
    kd.eval()
    assert not teacher.training
    kd.train()
    assert teacher.training  # registered: follows the trainer's train/eval switch


def _count(modules, cls):
    return sum(isinstance(m, cls) for m in modules)


def test_shared_one_predictor_one_joiner_and_projection_only_when_widths_differ():
    student = _model(dim=16)
    kd = CodertKD("shared", _model(dim=24, seed=1), student_dim=16, ctc_weight=0.5)
    modules = list(student.modules()) + list(kd.modules())
    assert _count(modules, Decoder) == 1 and _count(modules, Joiner) == 1
    assert {id(p) for p in kd.parameters()}.isdisjoint(id(p) for p in student.parameters())
    assert all(k.startswith(("teacher_encoder.", "proj.")) for k in kd.state_dict())
    assert not hasattr(kd, "teacher") and kd.frozen_teacher is None
    assert isinstance(kd.proj, nn.Linear) and kd.proj.weight.shape == (16, 24)
    same_width = CodertKD("shared", _model(dim=16, seed=1), student_dim=16)
    assert isinstance(same_width.proj, nn.Identity)
    assert all(k.startswith("teacher_encoder.") for k in same_width.state_dict())


def test_shared_teacher_loss_goes_through_the_student_joiner():
    student = _model(dim=16)
    kd = CodertKD("shared", _model(dim=24, seed=1), scale=0.0, ctc_weight=0.5, student_dim=16)
    batch = _batch()
    enc, enc_lens, layers = student.encode(batch["features"], batch["feature_lens"])
    loss, logs = kd(batch, enc, enc_lens, layers, KDContext(student, None))
    y, y_lens = _targets()
    with torch.no_grad():
        t_enc, t_lens, _ = kd.teacher_encoder(batch["features"], batch["feature_lens"])
        t_enc = t_enc @ kd.proj.weight.T + kd.proj.bias
        rnnt = student.sequence_loss(t_enc, t_lens, y, y_lens, reduction="none").mean()
        ctc = student.ctc_loss(t_enc, t_lens, y, y_lens, reduction="none").mean()
    assert logs["teacher_rnnt"] == pytest.approx(rnnt.item(), rel=1e-5)
    assert logs["teacher_ctc"] == pytest.approx(ctc.item(), rel=1e-5)
    assert loss.item() == pytest.approx(rnnt.item() + 0.5 * ctc.item(), rel=1e-5)  # scale 0: no KL
    loss.backward()
    for part in (student.joiner, student.decoder, kd.teacher_encoder, kd.proj):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in student.encoder.parameters())


def test_align_teacher_logits_hand_case():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 0.0, -1.0], [1.0, 1.0, 1.0], [3.0, -2.0, 0.5], [9.0, 9.0, -9.0]]])
    T = 2.0

    def p(row):
        e = [math.exp(v / T) for v in row]
        return [x / sum(e) for x in e]

    out, lens = align_teacher_logits(logits, torch.tensor([5]), num_frames=3, ratio=2, temperature=T)
    assert out.shape == (1, 3, 3) and lens.tolist() == [2]  # frame 4 (an incomplete pair) is dropped
    for j in range(2):
        a, b = p(logits[0, 2 * j].tolist()), p(logits[0, 2 * j + 1].tolist())
        got = torch.softmax(out[0, j] / T, -1).tolist()
        assert got == pytest.approx([(x + y) / 2 for x, y in zip(a, b)], abs=1e-6)
    assert out[0, 2].tolist() == [0.0, 0.0, 0.0]  # padding
    out, lens = align_teacher_logits(logits, torch.tensor([4]), num_frames=1, ratio=2.0, temperature=T)
    assert out.shape == (1, 1, 3) and lens.tolist() == [1]  # cut to the student's frames
    out, lens = align_teacher_logits(logits, torch.tensor([4]), num_frames=6, ratio=1)
    assert torch.equal(out[0, :4], logits[0, :4]) and lens.tolist() == [4] and out[0, 4:].abs().sum() == 0
    for bad in (1.5, 0, -2):
        with pytest.raises(ValueError, match="positive integer"):
            align_teacher_logits(logits, torch.tensor([5]), num_frames=3, ratio=bad)
    with pytest.raises(ValueError, match="positive integer"):
        CodertKD("static", _model(), frame_ratio=1.5)


def test_errors_and_config():
    with pytest.raises(ValueError, match="mode"):
        CodertKD("online", _model())
    aed = build_model(ModelConfig(arch="aed", dim=16, num_layers=1, num_heads=2, ff_dim=32, decoder_dim=16,
                                  decoder_layers=1, decoder_heads=2, decoder_ff_dim=32), vocab_size=V)
    with pytest.raises(ValueError, match="transducer"):
        CodertKD("tandem", aed)
    with pytest.raises(ValueError, match="student_dim"):
        CodertKD("shared", _model())
    with pytest.raises(ValueError, match="KDContext"):
        CodertKD("static", _model())(_batch(), torch.zeros(2, 3, 16), torch.tensor([3, 3]), [])
    assert kd_settings(method="codert").codert_mode == "static"
    assert kd_settings(method="codert", codert_mode="shared").codert_mode == "shared"
    with pytest.raises(ValueError):
        kd_settings(method="codert", codert_mode="online")


def test_make_kd_refuses_a_non_transducer_teacher_naming_the_run(tmp_path):
    from speechkd.config import Recipe, StudentRun, TeacherConfig
    from speechkd.pipeline import Experiment, make_kd

    run = StudentRun(name="codert-x", kd=kd_settings(method="codert", codert_mode="tandem"))
    recipe = Recipe(name="t", exp_dir=str(tmp_path), teacher=TeacherConfig(model=ModelConfig(arch="aed")),
                    students=[run])
    with pytest.raises(ValueError, match="codert-x"):
        make_kd(Experiment(recipe, progress=False), run)


@pytest.mark.parametrize("mode", ["tandem", "shared"])
def test_co_learned_teacher_own_lr_group_and_own_gradient_clipping(mode):
    from speechkd.config import TrainConfig
    from speechkd.training import AsrTask

    student, teacher = _model(), _model(dim=24, seed=1)
    kd = CodertKD(mode, teacher, teacher_lr=1e-3, student_dim=16)
    task = AsrTask(student, None, TrainConfig(lr=2e-3, warmup_steps=1, epochs=1, grad_clip=1.0), steps_per_epoch=4,
                   kd=kd)
    opt = task.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in opt.param_groups] == [2e-3, 1e-3]
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert not ids[0] & ids[1]
    assert ids[0] == {id(p) for p in student.parameters()}  # shared mode: the student's joiner stays the student's
    assert ids[1] == {id(p) for p in kd.parameters()}  # the teacher (tandem) / its encoder + projection (shared)
    # each group's norm is clipped on its own: the teacher's large gradient does not shrink the student's
    for g, scale in zip(opt.param_groups, (1e-3, 100.0)):
        for p in g["params"]:
            p.grad = torch.full_like(p, scale)
    before = [torch.cat([p.grad.flatten() for p in g["params"]]).norm() for g in opt.param_groups]
    assert before[0] < 1.0 < before[1]
    task.configure_gradient_clipping(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    after = [torch.cat([p.grad.flatten() for p in g["params"]]).norm() for g in opt.param_groups]
    assert after[0] == pytest.approx(before[0].item(), rel=1e-6)  # under the limit: untouched
    assert after[1] == pytest.approx(1.0, rel=1e-4)
    # without teacher_lr (and in static mode) there is one group, as before
    kd1 = CodertKD(mode, _model(dim=24, seed=1), student_dim=16)
    task1 = AsrTask(student, None, TrainConfig(lr=2e-3, warmup_steps=1, epochs=1), steps_per_epoch=4, kd=kd1)
    assert len(task1.configure_optimizers()["optimizer"].param_groups) == 1
    with pytest.raises(ValueError, match="teacher_lr"):
        CodertKD(mode, _model(dim=24, seed=1), teacher_lr=0.0, student_dim=16)
