"""DistilHuBERT student: prediction loss vs. a hand computation, init from the teacher, training, save/load.

Tiny random teachers (hidden 32, 2 heads, 4 layers, 2 conv layers: kernels (10, 3), strides (5, 2) -> 10 samples
per frame, receptive field 20 samples), 2-layer students.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from speechkd.losses.distill import prediction_loss  # noqa: E402
from speechkd.models.ssl import (  # noqa: E402
    HEADS_FILE,
    SSLStudent,
    build_ssl_student,
    init_from_teacher,
    load_ssl_student,
    student_config,
)
from speechkd.teachers.hf import SSLTeacher, load_ssl_model, load_ssl_teacher  # noqa: E402

from hf_tiny import tiny_hf_model  # noqa: E402


def _tiny_teacher(model_type: str = "hubert", seed: int = 0, **overrides):
    return tiny_hf_model(model_type, seed, **{"num_hidden_layers": 4, **overrides})


def _batch(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    wavs = torch.randn(len(lens), max(lens), generator=g)
    for i, n in enumerate(lens):
        wavs[i, n:] = 123.0  # garbage padding must not matter
    return wavs, torch.tensor(lens)


# ---------------------------------------------------------------------------------------------- prediction loss


def _hand_loss(pred, target, lens, w_l1, w_l2, w_cos, cos_type):
    """DistilHuBERT eq. 1 frame by frame: mean over valid frames of (1/D)|p - t|_1 (+ L2) + w * c(cos)."""
    l1 = l2 = cos = 0.0
    frames = 0
    d = pred.shape[-1]
    for n in range(pred.shape[0]):
        for t in range(int(lens[n])):
            p, y = pred[n, t].double(), target[n, t].double()
            l1 = l1 + (p - y).abs().sum() / d
            l2 = l2 + ((p - y) ** 2).sum() / d
            c = (p * y).sum() / (torch.sqrt((p * p).sum()) * torch.sqrt((y * y).sum()))
            cos = cos + (-torch.log(1.0 / (1.0 + torch.exp(-c))) if cos_type == "logsigmoid" else 1.0 - c)
            frames += 1
    l1, l2, cos = l1 / frames, l2 / frames, cos / frames
    return w_l1 * l1 + w_l2 * l2 + w_cos * cos, (l1, l2, cos)


@pytest.mark.parametrize(
    "weights, cos_type", [((1.0, 0.0, 1.0), "logsigmoid"), ((0.5, 2.0, 0.3), "cosine"), ((0.0, 1.0, 0.0), "cosine")]
)
def test_prediction_loss_equals_hand_computation(weights, cos_type):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    lens = torch.tensor([5, 3])
    loss, terms = prediction_loss(pred, target, lens, *weights, cos_type=cos_type)
    ref, (l1, l2, cos) = _hand_loss(pred, target, lens, *weights, cos_type)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for name, value in (("l1", l1), ("l2", l2), ("cos", cos)):
        torch.testing.assert_close(terms[name].double(), value, rtol=1e-5, atol=1e-6)
    assert -1.0 <= float(terms["cos_sim"]) <= 1.0


def test_prediction_loss_ignores_padding_and_checks_inputs():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(3, 6, 8, generator=g, requires_grad=True)
    target = torch.randn(3, 6, 8, generator=g)
    lens = torch.tensor([6, 2, 4])
    loss, _ = prediction_loss(pred, target, lens)
    (grad,) = torch.autograd.grad(loss, pred)

    # other padded values, and more padded frames: same loss, same gradient on valid frames, none on padding
    pad = torch.arange(9)[None, :] >= lens[:, None]  # (N, T')
    pred2 = torch.cat([pred.detach(), torch.zeros(3, 3, 8)], 1).masked_fill(pad[..., None], 55.0).requires_grad_()
    target2 = torch.cat([target, torch.zeros(3, 3, 8)], 1).masked_fill(pad[..., None], -7.0)
    loss2, _ = prediction_loss(pred2, target2, lens)
    (grad2,) = torch.autograd.grad(loss2, pred2)
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad2[:, :6], grad, rtol=1e-6, atol=1e-8)
    assert torch.all(grad2[pad] == 0)

    zero, terms = prediction_loss(pred, target, torch.tensor([0, 0, 0]))
    assert float(zero.detach()) == 0.0 and zero.requires_grad and float(terms["l1"]) == 0.0

    with pytest.raises(ValueError, match=r"\(N, T, D\)"):
        prediction_loss(pred, target[:, :5], lens)
    with pytest.raises(ValueError, match=r"\[0, T = 6\]"):
        prediction_loss(pred, target, torch.tensor([7, 2, 4]))
    with pytest.raises(ValueError, match="integer"):
        prediction_loss(pred, target, lens.float())
    with pytest.raises(ValueError, match="cos_type"):
        prediction_loss(pred, target, lens, cos_type="dot")
    with pytest.raises(ValueError, match="at least one"):
        prediction_loss(pred, target, lens, l1_weight=0.0, cos_weight=0.0)


# ---------------------------------------------------------------------------------------------- student


@pytest.mark.parametrize("model_type, layer_map", [("hubert", [2, 4]), ("wavlm", [3, 1])])
def test_init_copies_the_mapped_teacher_tensors(model_type, layer_map):
    teacher = _tiny_teacher(model_type)
    student = build_ssl_student(teacher, num_layers=2, layer_map=layer_map, target_layers=[2, 4])
    assert type(student.model) is type(teacher)

    # configs: only the depth (and DistilHuBERT's no-layerdrop / no-masking) differ
    s_cfg, t_cfg = student.model.config.to_dict(), teacher.config.to_dict()
    changed = {k for k in set(s_cfg) | set(t_cfg) if s_cfg.get(k) != t_cfg.get(k)}
    assert changed <= {"num_hidden_layers", "layerdrop", "mask_time_prob"} and s_cfg["num_hidden_layers"] == 2

    # weights: every student tensor is the teacher's; layer i is teacher layer layer_map[i]; nothing else
    s_sd, t_sd = student.model.state_dict(), teacher.state_dict()
    t_sd.pop("masked_spec_embed")  # the teacher's SpecAugment embedding (mask_time_prob 0.05); the student masks none
    expected = {}
    for key, value in t_sd.items():
        if key.startswith("encoder.layers."):
            index, rest = key[len("encoder.layers.") :].split(".", 1)
            if int(index) + 1 not in layer_map or rest.endswith("rel_attn_embed.weight"):
                continue
            key = f"encoder.layers.{layer_map.index(int(index) + 1)}.{rest}"
        expected[key] = value
    if model_type == "wavlm":  # relative position embedding: only in layer 1, always teacher layer 1's
        key = "encoder.layers.0.attention.rel_attn_embed.weight"
        expected[key] = t_sd[key]
    assert sorted(s_sd) == sorted(expected)
    for key, value in s_sd.items():
        assert torch.equal(value, expected[key]), key

    # the default map (first K layers) makes the student an exact truncation of the teacher
    first = build_ssl_student(teacher, num_layers=2, target_layers=[4])
    wavs, lens = _batch([400, 250], seed=2)
    t_out = SSLTeacher(teacher, layers=[0, 1, 2])(wavs, lens)
    with torch.no_grad():
        s_out = first(wavs, lens)
    assert torch.equal(s_out.lens, t_out.lens)
    for s, t in zip(s_out.hidden_states, t_out.hidden_states):
        torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match=r"out of range 1\.\.4"):
        build_ssl_student(teacher, layer_map=[1, 5], target_layers=[4])
    with pytest.raises(ValueError, match="2 student layers"):
        init_from_teacher(first, teacher, [1])
    with pytest.raises(ValueError, match=r"layers 0\.\.4"):
        build_ssl_student(teacher)  # DistilHuBERT's (4, 8, 12) do not exist in a 4-layer teacher
    with pytest.raises(ValueError, match="configs differ"):
        init_from_teacher(first, _tiny_teacher(model_type, intermediate_size=48))


def test_output_shapes_and_layer_to_layer():
    teacher = _tiny_teacher("hubert", hidden_size=48, num_attention_heads=2)  # teacher wider than the student
    student_model = transformers.HubertModel(student_config(teacher.config, 2, hidden_size=32, intermediate_size=64))
    student = SSLStudent(student_model, target_layers=[2, 3, 4], teacher_dim=48)
    wavs, lens = _batch([300, 210, 120])
    out = student(wavs, lens)
    assert out.lens.tolist() == [29, 20, 11]
    assert [tuple(h.shape) for h in out.hidden_states] == [(3, 29, 32)] * 3
    preds = student.predict(out)
    assert [tuple(p.shape) for p in preds] == [(3, 29, 48)] * 3
    assert isinstance(student.prediction_heads[0], torch.nn.Sequential)  # s3prl: Linear -> GELU -> Linear

    t_out = SSLTeacher(teacher, layers=[2, 3, 4])(wavs, lens)
    loss, logs = student.distill_loss(out, t_out)
    assert loss.dim() == 0 and {"l1_l2", "cos_l3", "cos_sim_l4", "loss_l4"} <= set(logs)
    mean = sum(logs[f"loss_l{i}"] for i in (2, 3, 4)) / 3
    torch.testing.assert_close(loss.detach(), mean)
    total, _ = student.distill_loss(out, t_out.hidden_states, layer_reduction="sum")
    torch.testing.assert_close(total.detach(), 3 * mean)
    with pytest.raises(ValueError, match="2 teacher hidden states for 3 target layers"):
        student.distill_loss(out, t_out.hidden_states[:2])

    # layer to layer: head i reads student layer i + 1, here a plain Linear
    l2l = build_ssl_student(teacher, num_layers=2, layer_to_layer=True, target_layers=[2, 4], head_type="linear")
    out = l2l(wavs, lens)
    assert isinstance(l2l.prediction_heads[1], torch.nn.Linear)
    preds = l2l.predict(out)
    torch.testing.assert_close(preds[0], l2l.prediction_heads[0](out.hidden_states[1]))
    torch.testing.assert_close(preds[1], l2l.prediction_heads[1](out.hidden_states[2]))
    assert build_ssl_student(teacher, num_layers=2, layer_to_layer=True).target_layers == [1, 2]
    with pytest.raises(ValueError, match="one target per student layer"):
        build_ssl_student(teacher, num_layers=2, layer_to_layer=True, target_layers=[4])
    with pytest.raises(ValueError, match="all 3 student layers"):
        l2l.predict(l2l(wavs, lens, layers=[2]))


def test_distillation_steps_reduce_the_loss():
    teacher = SSLTeacher(_tiny_teacher("hubert"), layers=[2, 4])
    student = build_ssl_student(teacher, num_layers=2, target_layers=[2, 4])
    wavs, lens = _batch([600, 480, 330], seed=3)
    targets = teacher(wavs, lens)

    def eval_loss():
        student.eval()
        with torch.no_grad():
            return float(student.distill_loss(student(wavs, lens), targets)[0])

    before = eval_loss()
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    student.train()
    for _ in range(12):
        loss, _ = student.distill_loss(student(wavs, lens), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not any(p.requires_grad for p in teacher.parameters())
    assert eval_loss() < 0.85 * before  # ~0.75 * before in practice, decreasing at every step


def test_feature_grad_mult_scales_the_cnn_gradient():
    teacher = _tiny_teacher("hubert")
    wavs, lens = _batch([300, 300], seed=4)
    grads = {}
    for mult in (1.0, 0.1, 0.0):
        torch.manual_seed(0)  # same heads
        student = build_ssl_student(teacher, num_layers=1, target_layers=[4], feature_grad_mult=mult)
        student.distill_loss(student(wavs, lens), [torch.ones(2, 29, 32)])[0].backward()
        grads[mult] = student.model.feature_extractor.conv_layers[0].conv.weight.grad
    torch.testing.assert_close(grads[0.1], 0.1 * grads[1.0])
    assert grads[0.0] is None and grads[1.0].abs().sum() > 0


def test_save_load_round_trip(tmp_path):
    teacher = SSLTeacher(_tiny_teacher("wavlm", feat_extract_norm="layer"), normalize=True)
    student = build_ssl_student(teacher, num_layers=2, target_layers=[1, 3])
    with torch.no_grad():  # move the heads and encoder away from the teacher init
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    student.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["config.json", "model.safetensors", "preprocessor_config.json", HEADS_FILE]
    )
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 2

    loaded = load_ssl_student(tmp_path)
    assert loaded.heads_config() == student.heads_config() and loaded.encoder.normalize
    wavs, lens = _batch([500, 260], seed=5)
    student.eval()
    with torch.no_grad():
        a, b = student(wavs, lens), loaded(wavs, lens)
        assert torch.equal(a.lens, b.lens)
        for x, y in zip(a.hidden_states + student.predict(a), b.hidden_states + loaded.predict(b)):
            assert torch.equal(x, y)

    # the next stage loads the encoder alone, as any SSL model
    encoder = load_ssl_model(tmp_path)
    assert type(encoder) is type(student.model) and encoder.config.num_hidden_layers == 2
    as_teacher = load_ssl_teacher(tmp_path)
    assert as_teacher.normalize
    with torch.no_grad():
        torch.testing.assert_close(as_teacher(wavs, lens).hidden_states[2], a.hidden_states[2])

    (tmp_path / HEADS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="load_ssl_model"):
        load_ssl_student(tmp_path)
