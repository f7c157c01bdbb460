"""The fast box evaluator against the protocol's reference on generated maps, and IoUs exactly on a cut.

Property tests (hypothesis, a bounded number of examples, derandomized so that every run checks the
same maps): maps of any size, height and width drawn independently (odd, one pixel wide, 1 x 1),
with few distinct values (ties everywhere), rings with holes, noise, and blocks; CAM thresholds that
land exactly on the map's own values (a pixel equal to the integer threshold is background: the
protocol binarises with ``>``); and ground-truth boxes built so that an estimated box's IoU is
exactly 0.3, 0.5 or 0.7, the protocol's cuts. Both rules (MaxBoxAcc's largest contour,
MaxBoxAccV2's every contour), alone and from one pass, must give the reference's booleans exactly.
"""

from __future__ import annotations

from fractions import Fraction

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scoremap_samples import box_correct_fast

from mmcam_fast.evaluation.box_evaluator import box_correct
from mmcam_fast.evaluation.box_fast import box_correct_fast_u8_rules, to_uint8
from mmcam_fast.evaluation.box_reference import box_correct_reference, box_ious_reference, boxes_at_threshold
from mmcam_fast.evaluation.level_tree import _band

CUTS = (30, 50, 70)  # MaxBoxAccV2's IoU thresholds; MaxBoxAcc uses 50 alone
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# IoUs exactly on a cut: "iou >= T / 100" counts them
# ---------------------------------------------------------------------------------------------
def ring_beside_square() -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """MaxBoxAcc's largest contour is the ring; the union-find alone would pick the square.

    The ring's outer contour encloses 576 (its hole included), the square's 324, but the ring's own
    quad area (what the union-find knows) is smaller than the square's: its area is only bounded, so
    both are candidates for the largest contour. The ground truth covers exactly half of the
    square's box (200 of 20 x 20 pixels): IoU 0.5, exactly MaxBoxAcc's cut, against 0 for the ring.
    The two candidates are in different bands of cuts, so the threshold must be traced; counting the
    exact 0.5 in the lower band makes both look alike and keeps the square: a wrong hit at IoU 50.
    """
    m = np.zeros((64, 64))
    m[2:27, 2:27] = 1.0
    m[5:24, 5:24] = 0.0  # a ring 25 pixels wide, 3 thick
    m[2:21, 36:55] = 1.0  # a solid 19 x 19 square; its protocol box (36, 2, 55, 21) is 20 x 20
    return m, [(36, 2, 45, 21)]


def hole_box_on_the_cut() -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """MaxBoxAccV2: the hole contour's box reaches IoU 0.5 exactly; the outer box only 165/352.

    A ring one pixel thick at the top, bottom and right, three at the left. Its hole contour's box
    H = (7, 5, 21, 15) (165 pixels) and the ground truth G = H widened to 330 pixels to the right:
    IoU(H, G) = 0.5 exactly, and the bound that decides whether holes are traced, |B+ & G| / |G|,
    is exactly 0.5 too. The outer box scores 0.469, so whether the hole pass runs depends on 0.5
    counting as reaching the cut.
    """
    m = np.zeros((40, 60))
    m[5:15, 5:21] = 1.0
    m[6:14, 8:20] = 0.0
    return m, [(7, 5, 36, 15)]


@pytest.mark.parametrize(("scene", "multi", "ious", "expected"), [
    pytest.param(ring_beside_square, False, [50], [False], id="MaxBoxAcc-largest-contour"),
    pytest.param(hole_box_on_the_cut, True, list(CUTS), [True, True, False], id="MaxBoxAccV2-hole-box"),
])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_an_iou_exactly_on_a_cut_reaches_it(scene, multi, ious, expected, impl):
    scoremap, gt = scene()
    # the expectation by hand, from OpenCV's boxes (independent of both implementations)
    u = to_uint8(scoremap)
    boxes = boxes_at_threshold(u[..., None], 0.5, multi)
    best = max(_exact_iou(box, gt[0]) for box in boxes)
    assert [best >= Fraction(cut, 100) for cut in ious] == expected
    got = box_correct(scoremap, gt, [0.5], ious, multi, impl)
    assert got[:, 0].tolist() == expected, f"{impl}: {got[:, 0].tolist()} at IoU cuts {ious}"


def test_band_counts_the_cuts_an_iou_reaches_including_an_equal_one():
    cuts = np.array([0.3, 0.5, 0.7])
    assert [_band(iou, cuts) for iou in (0.0, 0.3, 0.49, 0.5, 0.7, 1.0, -1.0)] == [0, 1, 1, 2, 3, 3, 0]
    assert _band(165 / 330, cuts) == 2 and _band(3 / 10, cuts) == 1  # exact ratios, not literals


def _exact_iou(box, gt) -> Fraction:
    """IoU on inclusive pixels as an exact fraction (the protocol's arithmetic, without rounding)."""
    iw = min(box[2], gt[2]) - max(box[0], gt[0]) + 1
    ih = min(box[3], gt[3]) - max(box[1], gt[1]) + 1
    inter = max(0, iw) * max(0, ih)
    area = lambda b: (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    union = area(box) + area(gt) - inter
    return Fraction(inter, union) if union > 0 else Fraction(0)


# ---------------------------------------------------------------------------------------------
# Property: fast == reference on generated maps, thresholds and boxes
# ---------------------------------------------------------------------------------------------
def generated_map(kind: str, h: int, w: int, levels: int, seed: int) -> np.ndarray:
    """A score map in [0, 1] of one of several kinds; ``levels`` distinct values make ties."""
    rng = np.random.default_rng(seed)
    values = np.linspace(0, 1, levels + 1)[1:]  # the map's non-zero values; 1.0 among them
    if kind == "noise":
        m = np.where(rng.random((h, w)) < rng.uniform(0.1, 0.9), rng.choice(values, (h, w)), 0.0)
    elif kind == "blocks":  # thick shapes with holes
        small = rng.choice(np.concatenate([[0.0], values]), (max(1, h // 3), max(1, w // 3)))
        m = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    elif kind == "rings":  # components with holes, islands inside holes
        yy, xx = np.mgrid[0:h, 0:w]
        m = np.zeros((h, w))
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            radius, width = rng.uniform(0, max(h, w) / 2 + 1), rng.uniform(0.6, 3)
            ring = np.abs(np.hypot(yy - cy, xx - cx) - radius) < width
            m = np.where(ring, np.maximum(m, rng.choice(values)), m)
    else:  # "smooth": a CAM as a backbone gives it, bicubic from a small grid, quantised to levels
        cam = rng.random((max(1, h // 4), max(1, w // 4)))
        up = cv2.resize(cam, (w, h), interpolation=cv2.INTER_CUBIC)
        span = up.max() - up.min()
        m = np.round((up - up.min()) / span * levels) / levels if span > 0 else np.zeros((h, w))
    return np.clip(m, 0.0, 1.0)


def exact_cut_box(box, cut: Fraction, h: int, w: int):
    """A box G with IoU(box, G) exactly ``cut``: inside ``box`` (|G| = cut |box|) or around it."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    for gw in range(1, bw + 1):  # G inside the box: IoU = |G| / |box|
        gh = cut * bw * bh / gw
        if gh.denominator == 1 and 1 <= gh <= bh:
            return (x0, y0, x0 + gw - 1, y0 + int(gh) - 1)
    for gw in range(bw, w + 1):  # G around the box: IoU = |box| / |G|
        gh = bw * bh / (cut * gw)
        if gh.denominator == 1 and bh <= gh <= h:
            # placed to contain the box and stay inside the map (gw <= w, gh <= h)
            gx0, gy0 = min(x0, w - gw), min(y0, h - int(gh))
            return (gx0, gy0, gx0 + gw - 1, gy0 + int(gh) - 1)
    return None


@st.composite
def scenes(draw):
    h = draw(st.integers(1, 40))
    w = draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["noise", "blocks", "rings", "smooth"]))
    levels = draw(st.sampled_from([1, 2, 3, 5, 255]))
    seed = draw(st.integers(0, 2**32 - 1))
    scoremap = generated_map(kind, h, w, levels, seed)
    u = to_uint8(scoremap)
    umax = int(u.max())
    # thresholds exactly on the map's values (int(tau * max) == v: pixels equal to v are background),
    # half-way between them, and a coarse grid; the protocol's list is np.arange(0, 1, 0.01)
    taus = {round(k / 20, 2) for k in range(20)}
    if umax > 0:
        for v in np.unique(u).tolist():
            taus.update({v / umax, (v + 0.5) / umax, max(0.0, (v - 0.5) / umax)})
    taus = sorted(t for t in taus if t < 1)
    # ground truth: a random box, and boxes with an IoU exactly on a cut against an estimated box
    rng = np.random.default_rng(seed + 1)
    gx0, gx1 = sorted(int(v) for v in rng.integers(0, w, 2))
    gy0, gy1 = sorted(int(v) for v in rng.integers(0, h, 2))
    gts = [[(gx0, gy0, gx1, gy1)]]
    multi = draw(st.booleans())
    tau = draw(st.sampled_from(taus))
    estimated = boxes_at_threshold(u[..., None], tau, multi)
    for cut in CUTS:
        box = estimated[draw(st.integers(0, len(estimated) - 1))]
        exact = exact_cut_box(box, Fraction(cut, 100), h, w)
        if exact is not None:
            gts.append([exact])
            gts.append([exact, (gx0, gy0, gx1, gy1)])  # several boxes: the best match counts
    return scoremap, taus, gts, multi


@PROPERTY
@given(scenes())
def test_fast_equals_reference_on_generated_maps(scene):
    scoremap, taus, gts, multi = scene
    for gt in gts:
        expected = box_correct_reference(scoremap, gt, taus, CUTS, multi)
        got = box_correct_fast(scoremap, gt, taus, CUTS, multi)
        bad = np.argwhere(expected != got)[:5].tolist()
        assert not bad, (f"multi={multi}, shape {scoremap.shape}, gt {gt}: fast differs at [iou, tau] {bad}; "
                         f"reference IoUs {box_ious_reference(scoremap, gt, taus, multi)}")
        # MaxBoxAcc alone at IoU 50 (its own bands of cuts) and both rules from one pass
        single = box_correct_reference(scoremap, gt, taus, [50], False)
        assert np.array_equal(box_correct_fast(scoremap, gt, taus, [50], False), single)
        both = box_correct_fast_u8_rules(to_uint8(scoremap), gt, taus, [([50], False), (list(CUTS), True)])
        assert np.array_equal(both[0], single)
        assert np.array_equal(both[1], box_correct_reference(scoremap, gt, taus, CUTS, True))


def test_generated_scenes_hit_the_exact_cuts():
    """The strategy really produces IoUs exactly on each cut (else the property above proves less)."""
    hits = set()
    rng = np.random.default_rng(0)
    for i in range(40):
        h, w = (int(v) for v in rng.integers(2, 41, 2))
        scoremap = generated_map(["noise", "blocks", "rings", "smooth"][i % 4], h, w, 3, i)
        u = to_uint8(scoremap)
        for box in boxes_at_threshold(u[..., None], 0.5, True):
            for cut in CUTS:
                exact = exact_cut_box(box, Fraction(cut, 100), h, w)
                if exact is not None:
                    assert _exact_iou(box, exact) == Fraction(cut, 100), (box, exact)
                    hits.add(cut)
    assert hits == set(CUTS)


def test_stats_count_only_the_passes_of_the_rules_asked_for():
    """MaxBoxAcc alone never needs the hole pass, MaxBoxAccV2 alone never traces; both add up."""
    for scene in (ring_beside_square, hole_box_on_the_cut):
        scoremap, gt = scene()
        u = to_uint8(scoremap)
        single, multi, both = {}, {}, {}
        box_correct_fast(scoremap, gt, [0.5], [50], False, single)
        box_correct_fast(scoremap, gt, [0.5], list(CUTS), True, multi)
        box_correct_fast_u8_rules(u, gt, [0.5], [([50], False), (list(CUTS), True)], both)
        assert single["holes"] == 0 and multi["traced"] == 0, (scene.__name__, single, multi)
        assert both["holes"] == multi["holes"] and both["traced"] == single["traced"]
        assert single["distinct"] == multi["distinct"] == both["distinct"] == 1  # one threshold, one pass
    assert single["holes"] == 0 and multi["holes"] == 1  # the hole scene needs the hole pass
    scoremap, gt = ring_beside_square()
    stats = {}
    box_correct_fast(scoremap, gt, [0.5], [50], False, stats)
    assert stats["traced"] == 1  # and the ring beside the square needs tracing


def test_the_hole_pass_runs_only_at_thresholds_that_need_it():
    """A ring (value 0.5) with its hole box on the ground truth, and a solid square (value 1.0).

    At tau 0.3 both are foreground and the ring's hole may reach a cut: the hole pass runs. At tau
    0.6 only the square is left, without holes: decided by the union-find alone.
    """
    scoremap, gt = hole_box_on_the_cut()
    scoremap = scoremap * 0.5
    scoremap[25:35, 40:50] = 1.0
    stats = {}
    got = box_correct_fast(scoremap, gt, [0.3, 0.6], list(CUTS), True, stats)
    assert np.array_equal(got, box_correct_reference(scoremap, gt, [0.3, 0.6], list(CUTS), True))
    assert stats["distinct"] == 2 and stats["holes"] == 1, stats
