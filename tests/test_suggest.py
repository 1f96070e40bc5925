"""Frame suggestions (issue #17): k-center diversity over real embeddings of simulated scenes,
uncertainty that finds a corrupted frame, bare backbones, determinism, and the CLI."""

from __future__ import annotations

import csv
import json
from itertools import combinations

import numpy as np
import pytest
import torch

from cnn_backbone import CnnBackbone, CnnCfg
from usfm_core.cli import main
from usfm_core.errors import ConfigError
from usfm_core.finetune.suggest import (
    DEFAULT_STRATEGY,
    FrameScores,
    load_model_or_backbone,
    min_pairwise_distance,
    score_frames,
    select_frames,
    suggest_frames,
)
from usfm_core.sim import simulate_cine

SIZE = 64  # model input side for the tests (the shipped sim-lesion model runs at any /32)
SCENES, PER_SCENE = 4, 5


@pytest.fixture(scope="module")
def sim_lesion():
    return load_model_or_backbone("sim-lesion")[0]


@pytest.fixture(scope="module")
def scenes():
    """A pool of frames from 4 simulated scenes (5 consecutive cine frames each), in scene
    order, and the scene of each frame."""
    frames = [simulate_cine(PER_SCENE, seed=20 + s, height=96, width=96).frames for s in range(4)]
    return np.concatenate(frames), np.repeat(np.arange(SCENES), PER_SCENE)


@pytest.fixture(scope="module")
def scene_scores(sim_lesion, scenes):
    return score_frames(sim_lesion, scenes[0], input_size=SIZE, batch_size=8)


def test_scores_shapes_and_ranges(scene_scores, scenes):
    n = len(scenes[0])
    emb = scene_scores.embeddings
    assert emb.shape[0] == n and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    for part in (scene_scores.entropy, scene_scores.disagreement):
        assert part.shape == (n,) and (part >= 0).all() and (part <= 1).all()
    np.testing.assert_allclose(
        scene_scores.uncertainty, scene_scores.entropy + scene_scores.disagreement, rtol=1e-6
    )


def test_k_center_covers_the_scenes(scene_scores, scenes):
    """First round (nothing labelled): k = 4 suggestions land in 4 different scenes, which a
    random choice of 4 of the 20 frames does only 1 time in ~8 (625 of 4845 subsets), and they
    spread further apart than the first 4 frames (one scene) or an average random set."""
    _, scene = scenes
    picks = [s.frame for s in select_frames(scene_scores, SCENES, strategy="kcenter")]
    assert len(set(scene[picks])) == SCENES
    emb = scene_scores.embeddings
    spread = min_pairwise_distance(emb, picks)
    assert spread > min_pairwise_distance(emb, range(SCENES))
    subsets = list(combinations(range(len(scene)), SCENES))
    rng = np.random.default_rng(0)
    random_spread = [min_pairwise_distance(emb, subsets[i]) for i in rng.choice(len(subsets), 200)]
    assert spread > np.quantile(random_spread, 0.9)


def test_labelled_scenes_steer_suggestions_elsewhere(scene_scores, scenes):
    """With scenes 0 and 1 labelled (one frame each), pure diversity suggests the other two."""
    _, scene = scenes
    picks = select_frames(
        scene_scores, 2, labelled=[0, PER_SCENE], uncertainty_weight=0.0, strategy="kcenter"
    )
    assert sorted(scene[[s.frame for s in picks]]) == [2, 3]
    assert all(s.frame not in (0, PER_SCENE) for s in picks)
    assert picks[0].diversity >= picks[1].diversity > 0
    assert picks[0].score >= picks[1].score


def test_uncertainty_finds_corrupted_frame(sim_lesion):
    """A frame of pure noise in a cine is the one the model is least sure about, and with the
    ends labelled it is the first suggestion (uncertain and far from the labelled frames)."""
    frames = simulate_cine(10, seed=3, height=96, width=96).frames.copy()
    frames[6] = np.random.default_rng(0).integers(0, 256, frames[6].shape, dtype=np.uint8)
    scores = score_frames(sim_lesion, frames, input_size=SIZE)
    assert int(np.argmax(scores.uncertainty)) == 6
    top = select_frames(scores, 3, labelled=[0, 9], strategy="kcenter")
    assert top[0].frame == 6 and top[0].uncertainty == pytest.approx(scores.uncertainty[6])
    # uncertainty alone (w = 1) also puts it first; pure diversity too (it is an outlier)
    assert (
        select_frames(scores, 1, labelled=[0, 9], uncertainty_weight=1.0, strategy="kcenter")[
            0
        ].frame
        == 6
    )
    assert (
        select_frames(scores, 1, labelled=[0, 9], uncertainty_weight=0.0, strategy="kcenter")[
            0
        ].frame
        == 6
    )


def test_bare_backbone_is_pure_diversity_and_seeded():
    """A backbone without head gives no uncertainty; duplicate frames tie exactly and the
    seed breaks the tie the same way every time."""
    torch.manual_seed(0)
    backbone = CnnBackbone(CnnCfg(width=8))
    cine = simulate_cine(3, seed=1, height=64, width=64).frames
    frames = np.concatenate([np.repeat(cine[:1], 4, 0), cine[1:]])  # frames 0-3 identical
    got = suggest_frames(backbone, frames, 3, input_size=SIZE, seed=5, strategy="kcenter")
    assert all(s.uncertainty is None for s in got)
    assert got == suggest_frames(
        backbone, list(frames), 3, input_size=SIZE, seed=5, strategy="kcenter"
    )
    scores = score_frames(backbone, frames, input_size=SIZE)
    assert scores.uncertainty is None
    firsts = {
        select_frames(scores, 1, labelled=[4, 5], seed=s, strategy="kcenter")[0].frame
        for s in range(8)
    }
    assert firsts <= {0, 1, 2, 3} and len(firsts) > 1  # a tie among duplicates, seed-broken


def test_select_frames_rules():
    emb = np.eye(4, dtype=np.float32)
    scores = FrameScores(emb, uncertainty=np.array([0.1, 0.2, 0.3, 0.4], np.float32))
    assert [s.frame for s in select_frames(scores, 10, labelled=[1], strategy="kcenter")][:1] == [3]
    assert len(select_frames(scores, 10, labelled=[1])) == 3  # only unlabelled frames
    with pytest.raises(ConfigError, match="outside"):
        select_frames(scores, 2, labelled=[4], strategy="kcenter")
    with pytest.raises(ConfigError, match="k must"):
        select_frames(scores, 0, strategy="kcenter")
    with pytest.raises(ConfigError, match="weight"):
        select_frames(scores, 1, uncertainty_weight=1.5, strategy="kcenter")


# ---------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiff_cine(tmp_path_factory):
    from usfm_core.sim import export_cine

    folder = tmp_path_factory.mktemp("suggest-cli")
    paths = export_cine(simulate_cine(8, seed=4, height=96, width=96), folder / "cine.tif", "tiff")
    return paths["scan"]


def test_cli_suggest_writes_csv_and_json(tiff_cine, tmp_path, capsys):
    out = tmp_path / "frames.csv"
    args = ["suggest", "sim-lesion", str(tiff_cine), "--k", "3", "--input-size", str(SIZE)]
    assert main([*args, "--labelled", "0,6-7", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "rank" in printed and "uncertainty" in printed and "diversity" in printed
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    frames = [int(r["frame"]) for r in rows]
    assert len(set(frames)) == 3 and not set(frames) & {0, 6, 7}
    assert all(float(r["uncertainty"]) > 0 for r in rows)
    js = tmp_path / "frames.json"
    assert main([*args, "--labelled", "0,6-7", "--out", str(js), "--no-progress"]) == 0
    assert [r["frame"] for r in json.loads(js.read_text())] == frames
    # Writing the same table again replaces it only on request.
    assert main([*args, "--labelled", "0,6-7", "--out", str(js), "--no-progress"]) == 1
    again = [*args, "--labelled", "0,6-7", "--out", str(js), "--overwrite", "--no-progress"]
    assert main(again) == 0
    assert [r["frame"] for r in json.loads(js.read_text())] == frames


def test_cli_suggest_refuses_input_and_bad_model(tiff_cine, capsys):
    before = tiff_cine.read_bytes()
    assert main(["suggest", "sim-lesion", str(tiff_cine), "--out", str(tiff_cine)]) == 1
    assert "overwrite the input" in capsys.readouterr().err
    assert tiff_cine.read_bytes() == before
    mine = tiff_cine.parent / "notes.csv"
    mine.write_text("the user's own file\n")
    assert main(["suggest", "sim-lesion", str(tiff_cine), "--out", str(mine)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert mine.read_text() == "the user's own file\n"
    assert main(["suggest", "no-such-model", str(tiff_cine), "--k", "2"]) == 1
    err = capsys.readouterr().err
    assert "no model named 'no-such-model'" in err and "sim-lesion" in err


def _blobs_with_outliers(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings ``(63, 16)``: three modes of 30 / 20 / 10 frames around orthogonal
    directions, plus 3 outliers half-way between the modes; the mode of each frame (-1 outlier)."""
    rng = np.random.default_rng(seed)
    eye = np.eye(16)
    parts, mode = [], []
    for m, n in enumerate((30, 20, 10)):
        parts.append(eye[m] + 0.15 * rng.standard_normal((n, 16)))
        mode += [m] * n
    parts.append(np.stack([eye[0] + eye[1], eye[1] + eye[2], eye[0] + eye[2]]) / 1.4
                 + 0.4 * rng.standard_normal((3, 16)))  # fmt: skip
    mode += [-1] * 3
    emb = np.concatenate(parts)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32), np.array(mode)


def test_typical_strategy_picks_dense_frames_of_every_mode():
    """TypiClust rule: 3 picks with nothing labelled = one per mode, each among its mode's
    most typical (densest) frames, never an outlier; k-center's picks are farther out."""
    emb, mode = _blobs_with_outliers()
    scores = FrameScores(embeddings=emb)
    typical = [s.frame for s in select_frames(scores, 3, strategy="typical")]
    assert sorted(mode[typical]) == [0, 1, 2]
    for f in typical:
        members = np.flatnonzero(mode == mode[f])
        centre = emb[members].mean(0)
        closeness = emb[members] @ centre
        assert emb[f] @ centre >= np.quantile(closeness, 0.5)  # in the denser half of its mode
    kcenter = [s.frame for s in select_frames(scores, 3, strategy="kcenter")]
    centre_of = {m: emb[mode == m].mean(0) for m in (0, 1, 2)}

    def off_centre(picks):
        return np.mean([1 - emb[f] @ centre_of[mode[f]] / np.linalg.norm(centre_of[mode[f]])
                        if mode[f] >= 0 else 1.0 for f in picks])  # fmt: skip

    assert off_centre(typical) < off_centre(kcenter)


def test_typical_strategy_goes_to_uncovered_modes_and_uses_uncertainty():
    """Labels in modes 0 and 1 send the next pick to mode 2; with w = 1 the pick inside the
    chosen cluster is its most uncertain frame; the result is deterministic per seed."""
    emb, mode = _blobs_with_outliers(1)
    labelled = [int(np.flatnonzero(mode == 0)[0]), int(np.flatnonzero(mode == 1)[0])]
    unc = np.random.default_rng(2).random(len(emb)).astype(np.float32)
    scores = FrameScores(embeddings=emb, uncertainty=unc)
    pick = select_frames(scores, 1, labelled, uncertainty_weight=0.0, strategy="typical")[0]
    assert mode[pick.frame] == 2 and pick.diversity > 0
    sure = select_frames(scores, 1, labelled, uncertainty_weight=1.0, strategy="typical")[0]
    in_mode2 = np.flatnonzero(mode == 2)
    assert sure.frame == in_mode2[np.argmax(unc[in_mode2])]
    again = select_frames(scores, 4, labelled, strategy="typical", seed=5)
    assert [s.frame for s in again] == [
        s.frame for s in select_frames(scores, 4, labelled, strategy="typical", seed=5)
    ]
    assert not {s.frame for s in again} & set(labelled)
    with pytest.raises(ConfigError, match="strategy"):
        select_frames(scores, 1, strategy="coreset")


def test_random_rule_is_the_default_seeded_and_nested():
    """The default rule (chosen on validation data) draws unlabelled frames in one seeded
    permutation: the same frames for the same seed, other frames for another seed, and a later
    round (its picks labelled) continues the same order. Uncertainty and diversity are still
    reported; the score is 0 (not ranked)."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    unc = rng.random(40).astype(np.float32)
    scores = FrameScores(emb, uncertainty=unc)
    assert DEFAULT_STRATEGY == "random"
    first = select_frames(scores, 5, labelled=[3])
    assert [s.frame for s in first] == [s.frame for s in select_frames(scores, 5, labelled=[3])]
    order = [int(i) for i in np.random.default_rng(0).permutation(40) if i != 3]
    assert [s.frame for s in first] == order[:5]
    assert [s.frame for s in select_frames(scores, 5, labelled=[3], seed=1)] != order[:5]
    later = select_frames(scores, 5, labelled=[3, *(s.frame for s in first)])
    assert [s.frame for s in later] == order[5:10]
    for s in first:
        assert s.score == 0.0 and s.uncertainty == pytest.approx(float(unc[s.frame]))
        assert s.diversity is not None and s.diversity > 0
    assert [s.rank for s in first] == [1, 2, 3, 4, 5]
    assert len(select_frames(scores, 100, labelled=range(30))) == 10  # only what is left


def test_cli_strategy_choices_match_the_core():
    from usfm_core.commands import suggest as cmd
    from usfm_core.finetune import suggest as core

    assert cmd.STRATEGIES == core.STRATEGIES and cmd.DEFAULT_STRATEGY == core.DEFAULT_STRATEGY
