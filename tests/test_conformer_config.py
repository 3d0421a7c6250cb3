"""Conformer encoder shapes and padding invariance; recipe schema strictness."""

import pytest
import torch

from speechkd.config import RecipeError, load_recipe
from speechkd.models.conformer import ConformerEncoder, subsampled_lens


@pytest.mark.parametrize("sub", [2, 4, 8])
def test_subsampled_lens_match_actual_output(sub):
    enc = ConformerEncoder(input_dim=20, dim=16, num_layers=1, num_heads=2, ff_dim=32, subsampling=sub).eval()
    for t in (40, 41, 57):
        out, lens, layers = enc(torch.randn(1, t, 20), torch.tensor([t]))
        assert out.shape[1] == int(lens[0]) == int(subsampled_lens(torch.tensor([t]), sub)[0])
        assert len(layers) == 1 and layers[-1] is out


def test_padding_does_not_change_valid_frames():
    torch.manual_seed(0)
    enc = ConformerEncoder(input_dim=20, dim=16, num_layers=2, num_heads=2, ff_dim=32).eval()
    x = torch.randn(2, 60, 20)
    lens = torch.tensor([60, 33])
    with torch.no_grad():
        out, out_lens, _ = enc(x, lens)
        alone, alone_lens, _ = enc(x[1:, :33], lens[1:])
    n = int(out_lens[1])
    assert n == int(alone_lens[0])
    torch.testing.assert_close(out[1, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_too_short_input_is_an_error():
    enc = ConformerEncoder(input_dim=20, dim=16, num_layers=1, num_heads=2, ff_dim=32, subsampling=4)
    with pytest.raises(ValueError, match="too short"):
        enc(torch.randn(1, 5, 20), torch.tensor([5]))


def test_recipe_unknown_key_is_an_error(tmp_path):
    good = tmp_path / "r.yaml"
    good.write_text("name: x\nexp_dir: e\nstudents:\n  - {name: b, kd: {method: mvq}}\n")
    r = load_recipe(good)
    assert r.students[0].kd.method == "mvq" and r.data.corpus == "commands"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nexp_dir: e\nteacher:\n  model: {dimm: 3}\n")
    with pytest.raises(RecipeError, match="dimm"):
        load_recipe(bad)
    bad.write_text("name: x\nexp_dir: e\nstudents:\n  - {name: b, kd: {method: magic}}\n")
    with pytest.raises(RecipeError, match="bad.yaml"):
        load_recipe(bad)


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert recipes
    for p in recipes:
        load_recipe(p)


def test_ctc_head_loss_matches_torch_ctc_and_is_optional():
    import torch.nn.functional as F

    from speechkd.config import ModelConfig
    from speechkd.models.build import build_transducer

    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, num_layers=1, num_heads=2, ff_dim=32, decoder_dim=8, joiner_dim=8)
    model = build_transducer(cfg, vocab_size=7).eval()
    enc, lens = torch.randn(2, 9, 16), torch.tensor([9, 6])
    y, y_lens = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2])
    lp = model.ctc_output(enc).log_softmax(-1)
    # one utterance at a time, without padding: (T_i, 1, V) log-probs
    manual = sum(F.ctc_loss(lp[i, : lens[i]].unsqueeze(1), y[i : i + 1, : y_lens[i]], lens[i : i + 1],
                            y_lens[i : i + 1], reduction="sum") for i in range(2)) / 2
    assert model.ctc_loss(enc, lens, y, y_lens).item() == pytest.approx(manual.item(), rel=1e-5)
    no_ctc = build_transducer(cfg.model_copy(update={"ctc_head": False}), vocab_size=7)
    assert no_ctc.ctc_output is None
    with pytest.raises(ValueError, match="no CTC head"):
        no_ctc.ctc_loss(enc, lens, y, y_lens)
