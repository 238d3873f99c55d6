import torch
from torch import nn

from earmark.training.supervised import TrainConfig, lr_factor, no_decay_names, spec_augment, train_supervised


def test_spec_augment_masks_bands_and_keeps_shape():
    x = torch.ones(8, 128, 100)
    cfg = TrainConfig(freq_masks=1, freq_mask_width=20, time_masks=1, time_mask_width=30)
    y = spec_augment(x, cfg, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    assert torch.equal(x, torch.ones(8, 128, 100))  # input untouched
    zeros = (y == 0).float().mean()
    assert 0 < zeros < 0.5
    # masks are whole bands: a zeroed mel bin is zero over the whole clip unless time-masked
    none = spec_augment(x, TrainConfig(freq_masks=0, time_masks=0), torch.Generator().manual_seed(0))
    assert torch.equal(none, x)


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 100, 10, 0.01) for s in range(100)]
    assert f[0] == 0.1 and abs(f[9] - 1.0) < 1e-9
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[-1] < 0.02


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_dim = 16
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(8 * 10, 16), nn.ReLU())

    def forward(self, x):
        return self.net(x)


def test_training_learns_a_separable_problem_and_freezes_the_encoder():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, 10, generator=g)
    labels = torch.arange(3).repeat(40)
    feats = centers[labels] + 0.3 * torch.randn(120, 8, 10, generator=g)
    enc = TinyEncoder()
    cfg = TrainConfig(epochs=15, batch_size=16, lr=1e-2, freq_masks=0, time_masks=0, mixup_prob=0.0)
    hist = train_supervised(enc, feats, labels, 3, cfg, progress=False)
    assert hist.loss[-1] < hist.loss[0] * 0.5
    assert hist.accuracy[-1] > 0.9
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc.training


def test_no_decay_names_cover_biases():
    names = no_decay_names(TinyEncoder())
    assert "net.1.bias" in names and "net.1.weight" not in names


def test_mixup_path_trains_and_reports_only_unmixed_accuracy():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(3, 8, 10, generator=g)
    labels = torch.arange(3).repeat(40)
    feats = centers[labels] + 0.3 * torch.randn(120, 8, 10, generator=g)
    cfg = TrainConfig(epochs=10, batch_size=16, lr=1e-2, mixup_prob=1.0, mixup_alpha=0.4)
    hist = train_supervised(TinyEncoder(), feats, labels, 3, cfg, progress=False)
    assert hist.loss[-1] < hist.loss[0]
    assert all(a != a for a in hist.accuracy)  # every step mixed: no clean accuracy to report (NaN)
