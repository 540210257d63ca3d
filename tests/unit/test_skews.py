"""Per-site skews: realised rates match the config, draws are seeded, no sample loses all."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from common.config import SkewConfig
from common.encoded import Clips, Encoded
from common.skews import apply_skews, site_levels

NONE = SkewConfig(missing_image_clients=0.0, missing_text_clients=0.0, missing_audio_clients=0.0,
                  missing_image_rate=0.0, missing_text_rate=0.0, missing_audio_rate=0.0,
                  image_noise=0.0, image_blur=0.0, text_corruption=0.0, label_noise=0.0)
WORDS = ["red", "green", "blue", "round", "square", "small", "large", "bright"]


def _data(n: int = 2000, num_classes: int = 5, size: int = 8, seed: int = 0,
          audio: bool = False) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(WORDS), (n, 6), generator=g)
    inputs = {"image": torch.randn(n, 3, size, size, generator=g),
              "text": [" ".join(WORDS[int(i)] for i in row) for row in ids]}
    labels = torch.randint(0, num_classes, (n,), generator=g)
    if audio:
        inputs["audio"] = Clips(torch.randn(n, 4, 10, generator=g),
                                torch.ones(n, 10, dtype=torch.bool))
    return Encoded(labels, inputs)


def _same(a: Encoded, b: Encoded) -> bool:
    return (torch.equal(a.pixel_values, b.pixel_values) and a.texts == b.texts
            and torch.equal(a.labels, b.labels) and torch.equal(a.has_image, b.has_image)
            and torch.equal(a.has_text, b.has_text))


def test_site_levels_ramp_from_zero_to_the_maximum():
    assert site_levels(0.8, 5) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert site_levels(0.8, 1) == [0.0]
    with pytest.raises(ValueError):
        site_levels(0.5, 0)


def test_per_sample_missing_rates_are_realised_and_never_both():
    data = _data()
    cfg = replace(NONE, missing_image_rate=0.3, missing_text_rate=0.2)
    for site in range(3):
        out, stats = apply_skews(data, cfg, site, 3, seed=7)
        assert abs((~out.has_image).float().mean().item() - 0.3) < 0.05
        assert abs((~out.has_text).float().mean().item() - 0.2) < 0.05
        assert stats["missing_image_rate"] == pytest.approx((~out.has_image).float().mean().item())
        assert not bool((~out.has_image & ~out.has_text).any())
        assert bool((out.pixel_values[~out.has_image] == 0).all())  # nothing of it is kept
        assert all(t == "" for t, k in zip(out.texts, out.has_text.tolist()) if not k)
    assert torch.equal(data.has_image, torch.ones(len(data), dtype=torch.bool))  # input intact


def test_missing_modality_clients_are_exactly_the_first_and_last_sites():
    data = _data(200)
    cfg = replace(NONE, missing_image_clients=0.4, missing_text_clients=0.2)
    image_less, text_less = [], []
    for site in range(5):
        out, stats = apply_skews(data, cfg, site, 5, seed=0)
        assert bool(out.has_image.all()) or not bool(out.has_image.any())
        assert bool(out.has_text.all()) or not bool(out.has_text.any())
        if not out.has_image.any():
            image_less.append(site)
            assert stats["image_missing_site"] and stats["missing_image_rate"] == 1.0
        if not out.has_text.any():
            text_less.append(site)
    assert image_less == [0, 1] and text_less == [4]


def test_no_sample_ever_loses_both_modalities():
    data = _data(500)
    # Overlapping client fractions and high rates: site 2 of 5 is in both client groups.
    cfg = replace(NONE, missing_image_clients=0.6, missing_text_clients=0.6,
                  missing_image_rate=0.7, missing_text_rate=0.7)
    for site in range(5):
        out, _ = apply_skews(data, cfg, site, 5, seed=3)
        assert not bool((~out.has_image & ~out.has_text).any())
    out, _ = apply_skews(data, cfg, 2, 5, seed=3)
    assert not bool(out.has_image.any()) and bool(out.has_text.all())  # the text is kept
    with pytest.raises(ValueError, match="no modality"):
        Encoded(data.labels[:2], {"image": data.pixel_values[:2], "text": data.texts[:2]},
                {"image": torch.tensor([True, False]), "text": torch.tensor([True, False])})


def test_label_noise_rate_matches_the_site_level_and_is_not_a_permutation():
    data = _data(2000, num_classes=5)
    cfg = replace(NONE, label_noise=0.6)
    out, stats = apply_skews(data, cfg, 3, 4, seed=1, num_classes=5)  # site level 0.6
    flipped = out.labels != data.labels
    assert abs(flipped.float().mean().item() - 0.6) < 0.05
    assert stats["label_flip_rate"] == pytest.approx(flipped.float().mean().item())
    for true_class in range(5):
        targets = set(out.labels[flipped & (data.labels == true_class)].tolist())
        assert len(targets) >= 3 and true_class not in targets
    first, stats0 = apply_skews(data, cfg, 0, 4, seed=1, num_classes=5)  # level 0
    assert torch.equal(first.labels, data.labels) and stats0["label_flip_rate"] == 0.0


def test_draws_are_seeded_per_site():
    data = _data(300)
    cfg = replace(NONE, missing_image_rate=0.3, missing_text_rate=0.3, image_noise=0.5,
                  text_corruption=0.5, label_noise=0.5)
    a, _ = apply_skews(data, cfg, 2, 3, seed=11)
    b, _ = apply_skews(data, cfg, 2, 3, seed=11)
    assert _same(a, b)
    other_site, _ = apply_skews(data, cfg, 1, 3, seed=11)
    other_seed, _ = apply_skews(data, cfg, 2, 3, seed=12)
    assert not torch.equal(a.has_image, other_site.has_image)  # same rate, different draws
    assert not torch.equal(a.has_image, other_seed.has_image)
    assert not _same(a, other_seed)


def test_noise_and_blur_change_pixels_and_level_zero_changes_nothing():
    data = _data(64, size=16)
    for cfg in (replace(NONE, image_noise=0.8), replace(NONE, image_blur=1.0)):
        out, _ = apply_skews(data, cfg, 2, 3, seed=0)
        assert not torch.allclose(out.pixel_values, data.pixel_values)
        unchanged, _ = apply_skews(data, cfg, 0, 3, seed=0)  # site 0: level 0
        assert _same(unchanged, data)
    noisy, _ = apply_skews(data, replace(NONE, image_noise=0.8), 2, 3, seed=0)
    assert (noisy.pixel_values - data.pixel_values).std().item() == pytest.approx(0.8, rel=0.05)
    blurred, _ = apply_skews(data, replace(NONE, image_blur=1.0), 2, 3, seed=0)
    def roughness(x: torch.Tensor) -> float:
        return (x[..., 1:] - x[..., :-1]).abs().mean().item()
    assert roughness(blurred.pixel_values) < 0.5 * roughness(data.pixel_values)
    for site in range(3):
        assert _same(apply_skews(data, NONE, site, 3, seed=0)[0], data)


def test_text_corruption_drops_or_swaps_words_at_the_site_level():
    data = _data(400)
    out, stats = apply_skews(data, replace(NONE, text_corruption=1.0), 1, 2, seed=0)
    assert stats["text_corruption"] == 1.0
    assert sum(a != b for a, b in zip(out.texts, data.texts)) > 0.9 * len(data)
    assert all(t.split() and set(t.split()) <= set(s.split())
               for t, s in zip(out.texts, data.texts))  # only original words, never empty
    mild, _ = apply_skews(data, replace(NONE, text_corruption=0.2), 1, 2, seed=0)
    changed = sum(a != b for a, b in zip(mild.texts, data.texts)) / len(data)
    assert 0.3 < changed < 1.0  # 6 words at p = 0.2: P(no change) = 0.8 ** 6 ~ 0.26


def test_three_modalities_lose_sites_in_blocks_and_rows_at_exact_disjoint_rates():
    data = _data(3000, audio=True)
    clients = replace(NONE, missing_image_clients=0.2, missing_audio_clients=0.3,
                      missing_text_clients=0.2)
    lost = {m: [s for s in range(10) if not apply_skews(data, clients, s, 10, seed=0)[0]
                .has(m).any()] for m in ("image", "audio", "text")}
    assert lost == {"image": [0, 1], "audio": [2, 3, 4], "text": [8, 9]}  # image, audio, text
    rates = replace(NONE, missing_image_rate=0.2, missing_audio_rate=0.3, missing_text_rate=0.25)
    out, stats = apply_skews(data, rates, 1, 3, seed=4)
    missing = {m: ~out.has(m) for m in ("image", "audio", "text")}
    for m, rate in (("image", 0.2), ("audio", 0.3), ("text", 0.25)):
        assert abs(missing[m].float().mean().item() - rate) < 0.03
        assert stats[f"missing_{m}_rate"] == pytest.approx(missing[m].float().mean().item())
    assert int(torch.stack(list(missing.values())).sum(0).max()) == 1  # one at most per row
    assert bool((out.inputs["audio"].features[missing["audio"]] == 0).all())
    # Turning the audio skew on leaves the image and text draws as they were.
    two, _ = apply_skews(data, replace(rates, missing_audio_rate=0.0), 1, 3, seed=4)
    assert torch.equal(two.has_image, out.has_image) and torch.equal(two.has_text, out.has_text)


def test_a_row_that_would_lose_every_modality_keeps_its_text_else_image_else_audio():
    data = _data(200, audio=True)
    everything = replace(NONE, missing_image_clients=1.0, missing_text_clients=1.0,
                         missing_audio_rate=1.0)
    out, _ = apply_skews(data, everything, 0, 2, seed=0)
    assert bool(out.has_text.all()) and not out.has_image.any() and not out.has("audio").any()
    no_text = Encoded(data.labels, {"image": data.pixel_values, "audio": data.inputs["audio"]})
    out, stats = apply_skews(no_text, everything, 0, 2, seed=0)
    assert bool(out.has_image.all()) and not out.has("audio").any()
    assert "missing_text_rate" not in stats and stats["missing_audio_rate"] == 1.0
    audio_only = Encoded(data.labels, {"audio": data.inputs["audio"]})
    assert bool(apply_skews(audio_only, everything, 0, 2, seed=0)[0].has("audio").all())
