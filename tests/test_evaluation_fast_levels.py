"""The union-find passes of the fast box evaluator against OpenCV's contours, threshold by threshold.

For binary images of every kind (noise at many densities, blocks, rings one pixel thick, holes that
touch diagonally, islands inside holes, checkerboards, single pixels, full and empty images, shapes
on the border), at many thresholds, the passes must give exactly what ``cv2.findContours``
(``RETR_TREE``) and ``cv2.boundingRect`` / ``cv2.contourArea`` give: the set of outer contours'
boxes, the number of holes of each component, the area of every component without holes, the
first pixel of each component, and the set of hole contours' boxes. The rules the single-contour
decision relies on are checked too.
"""

import cv2
import numpy as np
import pytest

from mmcam_fast.evaluation.level_tree import (
    GROUPS4,
    GROUPS8,
    QUADS,
    STEPS4,
    STEPS8,
    _row_divisor,
    earlier_masks,
    hole_levels,
    needed_levels,
    outer_levels,
    sort_by_value,
)


def ring(h, w, y0, x0, y1, x1, thickness=1):
    m = np.zeros((h, w), bool)
    m[y0:y1 + 1, x0:x1 + 1] = True
    m[y0 + thickness:y1 + 1 - thickness, x0 + thickness:x1 + 1 - thickness] = False
    return m


def shaped_images():
    """Hand-made binary shapes (as 0/200 uint8 maps) for the corner cases of contour tracing."""
    shapes = []
    shapes.append(ring(9, 9, 1, 1, 7, 7))  # a thin ring: hole contour nearly as large as the outer one
    shapes.append(ring(5, 5, 0, 0, 4, 4))  # a thin ring on the border
    diamond = np.zeros((5, 5), bool)
    diamond[[1, 2, 2, 3], [2, 1, 3, 2]] = True  # a one-pixel hole inside a diamond: equal areas
    shapes.append(diamond)
    two_holes = np.ones((5, 7), bool)
    two_holes[1, 1] = two_holes[2, 2] = False  # holes touching diagonally: two 4-components
    two_holes[2, 4] = two_holes[3, 5] = False
    shapes.append(two_holes)
    nested = ring(15, 15, 0, 0, 14, 14) | ring(15, 15, 4, 4, 10, 10)  # island inside a hole, with a hole
    nested[7, 7] = True
    shapes.append(nested)
    checker = (np.indices((8, 9)).sum(axis=0) % 2).astype(bool)  # one 8-connected component, many holes
    shapes.append(checker)
    shapes.append(np.ones((6, 6), bool))
    shapes.append(np.zeros((6, 6), bool))
    single = np.zeros((7, 7), bool)
    single[3, 3] = True
    shapes.append(single)
    corner = np.zeros((7, 7), bool)
    corner[0, 6] = True
    shapes.append(corner)
    lines = np.zeros((8, 8), bool)
    lines[2, 1:7] = True  # zero-area components
    lines[5, 3] = lines[6, 4] = True
    shapes.append(lines)
    return [(s * 200).astype(np.uint8) for s in shapes]


def random_images(rng, count):
    """Random uint8 maps of small sizes: noise, blocks, few levels, rings of random values."""
    images = []
    for i in range(count):
        h, w = (int(v) for v in rng.integers(1, 33, 2))
        kind = i % 5
        if kind == 0:  # noise at a random density of high values
            u = np.where(rng.random((h, w)) < rng.uniform(0.05, 0.95), rng.integers(1, 256, (h, w)), 0)
        elif kind == 1:  # noisy blocks (thick shapes with holes)
            small = rng.integers(0, 256, (max(1, h // 3), max(1, w // 3)))
            u = cv2.resize(small.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        elif kind == 2:  # few levels: many ties
            u = rng.integers(0, 4, (h, w)) * 80
        elif kind == 3:  # smooth: interpolated
            small = rng.integers(0, 256, (max(2, h // 5), max(2, w // 5))).astype(np.uint8)
            u = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        else:  # rings of random values and widths on a noisy background
            u = rng.integers(0, 40, (h, w))
            for _ in range(3):
                y0, x0 = rng.integers(0, max(1, h - 2)), rng.integers(0, max(1, w - 2))
                y1, x1 = rng.integers(y0, h), rng.integers(x0, w)
                u[ring(h, w, y0, x0, y1, x1, int(rng.integers(1, 3)))] = rng.integers(60, 256)
        images.append(np.ascontiguousarray(u, dtype=np.uint8))
    return images


def opencv_contours(binary):
    """Outer contours as (box, twice area, first pixel, holes) and hole contours as pixel boxes."""
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return [], []
    hierarchy = hierarchy[0]
    depth = []
    for i in range(len(contours)):
        d, parent = 0, hierarchy[i][3]
        while parent >= 0:
            d, parent = d + 1, hierarchy[parent][3]
        depth.append(d)
    outer, holes = [], []
    for i, contour in enumerate(contours):
        x, y, w, h = cv2.boundingRect(contour)
        if depth[i] % 2 == 0:
            children = sum(1 for j in range(len(contours)) if hierarchy[j][3] == i)
            first = int(contour[0, 0, 1]) * binary.shape[1] + int(contour[0, 0, 0])
            outer.append(((x, y, x + w - 1, y + h - 1), round(2 * cv2.contourArea(contour)), first, children))
        else:  # a hole contour runs through the foreground pixels around the hole
            holes.append((x + 1, y + 1, x + w - 2, y + h - 2))
    return outer, holes


def passes(u, levels):
    """Records of both passes at ``levels``: components and holes per threshold."""
    need = np.zeros(256, bool)
    need[levels] = True
    order, hist = sort_by_value(u)
    components = np.empty((u.size * len(levels) + 1, 8), np.int64)
    holes = np.empty((u.size * len(levels) + 1, 5), np.int64)
    gt = np.array([[0, 0, 3, 3]])
    _, _, n_components = outer_levels(order, hist, earlier_masks(u), u.shape, need, gt,
                                      np.array([0.5]), 3, GROUPS8, STEPS8, QUADS, components)
    _, n_holes = hole_levels(order, hist, earlier_masks(u), u.shape, need, gt, GROUPS4, STEPS4,
                             holes)
    assert n_components <= len(components) and n_holes <= len(holes)
    return components[:n_components], holes[:n_holes]


def check_levels(u, levels):
    components, holes = passes(u, levels)
    for t in levels:
        outer, hole_boxes = opencv_contours(((u > t) * 255).astype(np.uint8))
        mine = components[components[:, 0] == t]
        expected = sorted((box, first, children) for box, _, first, children in outer)
        got = sorted((tuple(int(v) for v in r[1:5]), int(r[7]), 1 - int(r[6]) // 4) for r in mine)
        assert got == expected, f"threshold {t}: components (box, first pixel, holes) differ\n{u}"
        # the quad area is the contour area exactly when the component has no hole
        areas = {first: area for _, area, first, children in outer if children == 0}
        for r in mine:
            if r[6] == 4:
                assert r[5] == areas[int(r[7])], f"threshold {t}: area of the component at {r[1:5]}"
        got_holes = sorted(tuple(int(v) for v in r[1:]) for r in holes[holes[:, 0] == t])
        assert got_holes == sorted(hole_boxes), f"threshold {t}: hole boxes differ\n{u}"


@pytest.mark.parametrize("index", range(11))
def test_shapes_equal_opencv(index):
    u = shaped_images()[index]
    check_levels(u, [0, 100, 199] if u.max() else [0])


def test_random_images_equal_opencv():
    rng = np.random.default_rng(0)
    for u in random_images(rng, 400):
        top = int(u.max())
        levels = sorted({0, top // 3, top // 2, max(0, top - 1), *rng.integers(0, max(1, top), 3).tolist()})
        check_levels(u, [t for t in levels if t < max(top, 1)])


def test_hole_contours_never_enclose_more_than_their_outer_contour():
    # why the largest contour is always an outer one: a hole's area is at most its component's,
    # and the component's outer contour comes first in OpenCV's list (ties keep the outer one)
    rng = np.random.default_rng(1)
    images = [u > 0 for u in shaped_images()] + [u > 60 for u in random_images(rng, 300)]
    equal = 0
    for binary in images:
        contours, hierarchy = cv2.findContours(binary.astype(np.uint8) * 255, cv2.RETR_TREE,
                                               cv2.CHAIN_APPROX_SIMPLE)
        for i, contour in enumerate(contours):
            parent = hierarchy[0][i][3]
            if _depth(hierarchy[0], i) % 2:  # a hole; its parent is its component's outer contour
                assert cv2.contourArea(contour) <= cv2.contourArea(contours[parent])
                assert parent < i
                equal += cv2.contourArea(contour) == cv2.contourArea(contours[parent])
    assert equal > 0  # the thin rings do reach equality


def _depth(hierarchy, i):
    d, parent = 0, hierarchy[i][3]
    while parent >= 0:
        d, parent = d + 1, hierarchy[parent][3]
    return d


def test_without_holes_opencv_lists_components_in_reverse_raster_order():
    rng = np.random.default_rng(2)
    checked = 0
    for u in random_images(rng, 300):
        binary = ((u > 150) * 255).astype(np.uint8)
        contours, hierarchy = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
        if len(contours) < 2 or (hierarchy[0][:, 3] >= 0).any():
            continue
        firsts = [int(c[0, 0, 1]) * u.shape[1] + int(c[0, 0, 0]) for c in contours]
        assert firsts == sorted(firsts, reverse=True)
        checked += 1
    assert checked > 20


def test_needed_levels_truncate_like_the_protocol():
    u = np.array([[0, 7], [200, 255]], np.uint8)
    taus = np.array([-0.5, 0.0, 0.001, 0.3, 0.5, 0.999, 1.0, 2.0])
    levels, need, umax = needed_levels(u, taus)
    assert umax == 255
    assert levels.tolist() == [max(int(tau * np.max(u)), -1) if tau < 1 else min(int(tau * 255), 255)
                               for tau in taus]
    assert np.flatnonzero(need).tolist() == sorted({t for t in levels.tolist() if 0 <= t < 255})


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 4), (7, 2), (13, 9), (224, 224)])
def test_sort_by_value_is_decreasing_value_then_raster_order(shape):
    rng = np.random.default_rng(3)
    u = rng.integers(0, 256, shape).astype(np.uint8)
    u[:, : shape[1] // 2] //= 16  # runs of equal values
    order, hist = sort_by_value(u)
    h, w = shape
    expected = np.lexsort((np.arange(h * w), -u.ravel().astype(np.int64)))  # by value desc, then raster
    ys, xs = np.divmod(expected, w)
    np.testing.assert_array_equal(order, (ys + 1) * (w + 2) + xs + 1)
    np.testing.assert_array_equal(hist, np.bincount(u.ravel(), minlength=256))


@pytest.mark.parametrize("padded_width", [3, 4, 7, 226, 1000, 4097])
def test_row_divisor_is_exact_up_to_the_largest_map(padded_width):
    # the passes find a pixel's row with a multiply and a shift; maps have sides below 4096
    width, magic, shift = (int(v) for v in _row_divisor(padded_width))
    last = 4097 * padded_width  # past the last padded index of the tallest map
    q = np.unique(np.concatenate([np.arange(0, last, 7919), np.arange(last - 5000, last)])).astype(np.uint64)
    rows = (q * np.uint64(magic)) >> np.uint64(shift)
    np.testing.assert_array_equal(rows, q // np.uint64(width))
