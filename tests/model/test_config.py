"""Named configs, overrides and validation messages; the mmrec-100m size."""
import pytest
import torch

from mmrec import CONFIG_NAMES, ModelConfig, build_base, build_model, count_parameters, get_config


def test_presets_exist_and_overrides_apply():
    assert set(CONFIG_NAMES) == {"tiny", "small", "base", "mmrec-100m"}
    tiny = get_config("tiny", seq_len=64, dropout=0.1)
    assert (tiny.seq_len, tiny.dropout, tiny.d_model, tiny.n_layers) == (64, 0.1, 64, 2)
    assert 2000 <= tiny.vocab_size <= 4096
    base = get_config("base")
    assert (base.d_model, base.n_layers, base.ffn_dim, base.vocab_size) == (256, 12, 1024, 32000)
    assert get_config("tiny").dropout == 0.0


def test_unknown_names_and_keys_are_errors_naming_them():
    with pytest.raises(ValueError, match="'huge'"):
        get_config("huge")
    with pytest.raises(ValueError, match="d_modle"):
        get_config("tiny", d_modle=128)
    with pytest.raises(ValueError, match="n_layer"):
        build_model("tiny", n_layer=3)
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.from_dict({**get_config("tiny").to_dict(), "colour": "red"})


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"d_model": 60, "n_heads": 8}, "d_model"),
        ({"decay_lo_first": 0.0}, "decay_lo_first"),
        ({"decay_lo_last": 1.0}, "decay_lo_last"),
        ({"decay_lo_first": 0.9, "decay_lo_last": 0.5}, "decay_lo_first"),
        ({"n_layers": 0}, "n_layers"),
        ({"conv_size": -1}, "conv_size"),
        ({"chunk_size": -1}, "chunk_size"),
        ({"vocab_size": 10.5}, "vocab_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        get_config("tiny", **overrides)


def test_round_trip_through_dict():
    cfg = get_config("small", n_layers=3)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_decay_bounds_rise_with_depth():
    lows = get_config("base").decay_lower_bounds()
    assert len(lows) == 12
    assert lows[0] == pytest.approx(0.05) and lows[-1] == pytest.approx(0.99)
    assert all(a < b for a, b in zip(lows, lows[1:]))


def test_mmrec_100m_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = build_model("mmrec-100m")
        base = build_base("mmrec-100m")
    total = count_parameters(model)
    assert 95_000_000 <= total <= 110_000_000, total
    # two experts of the base's shape plus the fusion layer, nothing else
    assert total == 2 * count_parameters(base) + count_parameters(model.fusion)
