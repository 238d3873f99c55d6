"""Base-session augmentations: shape, determinism under a seeded generator, that they change the input
(and what they change it into); then each lever through train_supervised, bit-reproducible, with the
old recipe untouched at the defaults; early stopping on a validation split and its resume."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from earmark.encoders.config import EncoderConfig
from earmark.encoders.mamba import build_encoder
from earmark.training.augment import (
    FeatureScale,
    add_noise,
    cutmix,
    mix_clips,
    random_crop,
    random_gain,
    time_shift,
    virtual_mix,
    virtual_pair_class,
)
from earmark.training.supervised import (
    ADDED_LATER,
    TrainConfig,
    spec_augment,
    train_supervised,
    validation_split,
)

SCALE = FeatureScale(mean=-6.0, std=2.5)  # a normalizer's constants: log power = -6 + 5 x


def batch(seed: int = 0, b: int = 6, m: int = 32, t: int = 40) -> torch.Tensor:
    return torch.randn(b, m, t, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


AUGMENTATIONS = {
    "crop": lambda x, g: random_crop(x, 25, g),
    "shift": lambda x, g: time_shift(x, 8, g),
    "gain": lambda x, g: random_gain(x, 6.0, SCALE, g),
    "noise": lambda x, g: add_noise(x, 1.0, 0.0, 10.0, SCALE, g),
    "mix": lambda x, g: mix_clips(x, 1.0, 0.0, 6.0, SCALE, g),
    "cutmix": lambda x, g: cutmix(x, torch.eye(6), 1.0, g)[0],
    "virtual": lambda x, g: virtual_mix(x, torch.arange(6) % 3, 3, 4, 1.0, 0.1, g)[0],
    "specaugment": lambda x, g: spec_augment(x, TrainConfig(freq_mask_width=8, time_mask_width=10), g),
}


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_shape_determinism_and_change(name: str) -> None:
    fn = AUGMENTATIONS[name]
    x = batch()
    before = x.clone()
    a, b, c = fn(x, gen(0)), fn(x, gen(0)), fn(x, gen(1))
    assert torch.equal(x, before)  # the input is not modified
    assert a.shape == ((6, 32, 25) if name == "crop" else x.shape) and a.dtype == x.dtype
    assert torch.equal(a, b)  # the same seed, the same result
    assert not torch.equal(a, c)  # another seed, another draw
    if name != "crop":
        assert not torch.equal(a, x)  # it does something
    assert torch.isfinite(a).all()


def test_the_augmentations_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for fn in AUGMENTATIONS.values():
        fn(batch(), gen(0))
    assert torch.equal(torch.rand(3), expected)


def test_crop_takes_a_window_of_each_clip() -> None:
    x = batch()
    out = random_crop(x, 25, gen(3))
    for i in range(len(x)):
        starts = [s for s in range(16) if torch.equal(x[i, :, s : s + 25], out[i])]
        assert len(starts) == 1
    assert torch.equal(random_crop(x, 40, gen(3)), x) and torch.equal(random_crop(x, 0, gen(3)), x)


def test_shift_moves_each_clip_whole_with_zero_fill() -> None:
    x = batch()
    out = time_shift(x, 8, gen(2))
    for i in range(len(x)):
        shifts = [s for s in range(-8, 9) if torch.equal(out[i], _shifted(x[i], s))]
        assert shifts, i


def _shifted(clip: torch.Tensor, s: int) -> torch.Tensor:
    out = torch.zeros_like(clip)
    if s >= 0:
        out[:, s:] = clip[:, : clip.shape[1] - s]
    else:
        out[:, :s] = clip[:, -s:]
    return out


def test_gain_is_a_constant_in_log_power_within_the_range() -> None:
    x = batch()
    out = random_gain(x, 6.0, SCALE, gen(0))
    db = (SCALE.to_log_power(out) - SCALE.to_log_power(x)) / (torch.log(torch.tensor(10.0)) / 10)
    per_clip = db.flatten(1)
    assert torch.allclose(per_clip, per_clip[:, :1].expand_as(per_clip), atol=1e-4)
    assert (per_clip.abs() <= 6.0 + 1e-4).all() and per_clip[:, 0].std() > 0.5


def test_noise_and_mixing_add_power_and_follow_the_ratio() -> None:
    x = batch()
    for fn in (add_noise, mix_clips):
        loud = fn(x, 1.0, 0.0, 0.0, SCALE, gen(0))
        faint = fn(x, 1.0, 150.0, 150.0, SCALE, gen(0))
        assert (SCALE.to_log_power(loud) >= SCALE.to_log_power(x) - 1e-4).all()  # powers add, never remove
        assert (loud - x).abs().mean() > 10 * (faint - x).abs().mean()  # 0 dB changes far more than 150 dB
        assert torch.allclose(faint, x, atol=1e-2)
        assert torch.equal(fn(x, 0.0, 0.0, 0.0, SCALE, gen(0)), x)  # probability 0: nothing chosen
    # at 0 dB the background carries the clip's own mean power: the mix's mean power doubles (+3 dB)
    mixed = mix_clips(x, 1.0, 0.0, 0.0, SCALE, gen(5))
    power = lambda v: torch.logsumexp(SCALE.to_log_power(v).flatten(1), 1)  # noqa: E731
    changed = (mixed != x).flatten(1).any(1)
    assert torch.allclose((power(mixed) - power(x))[changed], torch.full((int(changed.sum()),), 0.6931), atol=1e-3)


def test_cutmix_pastes_one_box_and_mixes_targets_by_area() -> None:
    x, target = batch(), torch.eye(6)
    out, mixed = cutmix(x, target, 1.0, gen(4))
    changed = (out != x).any(0)  # (m, t): the box
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    assert changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # a rectangle
    assert torch.allclose(mixed.sum(1), torch.ones(6))
    kept = float(1 - changed.sum() / changed.numel())
    for row in mixed:  # its own class with the kept share, the partner's with the rest (or itself whole)
        values = sorted(row[row > 0].tolist())
        assert values == pytest.approx([1.0]) or values == pytest.approx(sorted([kept, 1 - kept]))


def test_at_the_defaults_the_inputs_get_specaugment_only_with_the_same_draws() -> None:
    from earmark.training.supervised import augment_inputs

    x, config = batch(), TrainConfig()
    g1, g2 = gen(7), gen(7)
    assert torch.equal(augment_inputs(x, config, g1, SCALE), spec_augment(x, config, g2))
    assert torch.equal(g1.get_state(), g2.get_state())  # the generator is where the old recipe left it


def test_virtual_mix_labels_pairs_of_different_classes() -> None:
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    x = batch()
    out, labels, chosen = virtual_mix(x, y, 3, 4, 1.0, 0.1, gen(0))
    assert chosen.any()
    assert ((labels >= 3) & (labels < 7) == chosen).all()
    assert torch.equal(out[~chosen], x[~chosen]) and torch.equal(labels[~chosen], y[~chosen])
    a, b = torch.tensor([0, 2, 1]), torch.tensor([2, 0, 2])
    assert torch.equal(virtual_pair_class(a, b, 3, 4), virtual_pair_class(b, a, 3, 4))  # unordered pairs
    same = virtual_mix(x, torch.zeros(6, dtype=torch.long), 3, 4, 1.0, 0.1, gen(0))
    assert not same[2].any() and torch.equal(same[0], x)  # one class in the batch: nothing virtual


def test_validation_split_is_stratified_seeded_and_disjoint() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    train, val = validation_split(labels, 0.2, seed=0)
    assert set(train.tolist()).isdisjoint(val.tolist()) and len(train) + len(val) == 16
    assert [int((labels[val] == c).sum()) for c in range(3)] == [2, 1, 0]  # a lone clip stays in training
    assert torch.equal(validation_split(labels, 0.2, seed=0)[1], val)
    assert not torch.equal(validation_split(labels, 0.2, seed=1)[1], val)


def test_new_fields_at_their_defaults_keep_the_cache_key_and_any_other_value_changes_it() -> None:
    base = TrainConfig().result_dict()
    assert not set(ADDED_LATER) & set(base)  # the key of an encoder trained before these fields existed
    for name, value in [("crop_frames", 50), ("time_shift", 4), ("gain_db", 3.0), ("noise_prob", 0.5),
                        ("noise_snr_min_db", 1.0), ("mix_prob", 0.5), ("mix_snr_max_db", 15.0),
                        ("cutmix_prob", 0.5), ("cutmix_alpha", 0.5), ("virtual_classes", 8),
                        ("val_fraction", 0.1), ("restore_best", False), ("virtual_spread", 0.2)]:
        changed = replace(TrainConfig(), **{name: value}).result_dict()
        assert changed != base and changed[name] == value, name
    with pytest.raises(ValueError, match="needs a validation split"):
        TrainConfig(patience=2)
    with pytest.raises(ValueError, match="virtual_classes"):
        TrainConfig(virtual_prob=0.5)
    with pytest.raises(ValueError, match="noise_snr_min_db"):
        TrainConfig(noise_snr_min_db=40.0)


# ----------------------------------------------------------------------------- through the training loop

TINY = EncoderConfig(embed_dim=16, depth=1, n_mels=32, d_state=4, expand=1, pool="mean", scan_impl="sequential")
CFG = TrainConfig(epochs=3, batch_size=8, lr=3e-3, warmup_epochs=0.5, threads=1)

LEVERS = {
    "crop": {"crop_frames": 24},
    "shift": {"time_shift": 6},
    "gain": {"gain_db": 6.0},
    "noise": {"noise_prob": 0.5},
    "mix": {"mix_prob": 0.5},
    "cutmix": {"cutmix_prob": 1.0},
    "virtual": {"virtual_classes": 6, "virtual_prob": 0.3},
    "early-stopping": {"val_fraction": 0.25, "patience": 2},
    "smoothing": {"label_smoothing": 0.1},
}


def data():
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(32) % 4
    feats = torch.randn(4, TINY.n_mels, 32, generator=g)[labels] + 0.5 * torch.randn(32, TINY.n_mels, 32, generator=g)
    return feats, labels


def train(seed: int = 0, _kw: dict | None = None, **changes):
    torch.manual_seed(seed)
    enc = build_encoder(TINY)
    feats, labels = data()
    hist = train_supervised(enc, feats, labels, 4, replace(CFG, seed=seed, **changes), progress=False,
                            feature_scale=SCALE, **(_kw or {}))
    return enc.state_dict(), hist


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def plain():
    return train()


@pytest.mark.parametrize("lever", list(LEVERS))
def test_each_lever_trains_reproducibly_and_changes_the_weights(lever: str, plain) -> None:
    a, hist = train(**LEVERS[lever])
    b, _ = train(**LEVERS[lever])
    assert equal(a, b)  # bit-identical given the seed
    assert not equal(a, plain[0])  # and not the plain recipe
    assert all(torch.isfinite(v).all() for v in a.values())
    assert len(hist.loss) >= 1 and all(v == v for v in hist.loss)


def test_validation_scores_every_epoch_and_early_stopping_ends_on_the_best_weights() -> None:
    # lr 0: nothing improves after the first epoch, so patience 1 stops after the second
    _, hist = train(lr=0.0, val_fraction=0.25, patience=1, epochs=5)
    assert len(hist.val_accuracy) == 2 and hist.best_epoch == 0 and hist.stopped_epoch == 1
    _, full = train(val_fraction=0.25, epochs=3)
    assert len(full.val_accuracy) == 3 and full.stopped_epoch is None
    assert full.best_epoch == max(range(3), key=lambda e: (full.val_accuracy[e], -e))
    seen = {}
    last, _ = train(val_fraction=0.25, epochs=3, restore_best=False,
                    _kw={"on_epoch": lambda e, m: seen.update({e: {k: v.clone() for k, v in m.state_dict().items()}})})
    assert equal(last, seen[2])


def test_resume_with_validation_gives_the_uninterrupted_weights(tmp_path) -> None:
    changes = {"val_fraction": 0.25, "patience": 3, "epochs": 4, "checkpoint_every": 1, "time_shift": 4}
    ref, ref_hist = train(**changes)

    class Stop(Exception):
        pass

    def interrupt(epoch, _m):
        if epoch == 1:
            raise Stop

    ckpt = tmp_path / "partial.safetensors"
    with pytest.raises(Stop):
        train(**changes, _kw={"checkpoint_path": ckpt, "on_epoch": interrupt})
    resumed, hist = train(**changes, _kw={"checkpoint_path": ckpt})
    assert equal(resumed, ref)
    assert hist.val_accuracy == ref_hist.val_accuracy and hist.best_epoch == ref_hist.best_epoch
