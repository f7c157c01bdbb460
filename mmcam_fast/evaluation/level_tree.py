"""Boxes of every threshold's contours at once: union-find over the level sets of a uint8 map.

The protocol binarizes ``u > t`` and asks OpenCV for the contours (``RETR_TREE``). What the box
evaluator needs from them is known without tracing, for all thresholds in one pass over the pixels:

- Outer contours are the 8-connected components of ``{u > t}``, one each, and a contour's
  ``boundingRect`` is its component's pixel bounding box.
- Hole contours are the 4-connected components of ``{u <= t}`` that do not touch the image border
  (OpenCV pads the image with zeros); the traced border of a hole runs through the foreground
  pixels 4-adjacent to it, so its ``boundingRect`` is the hole's bounding box grown by one pixel.
- ``cv2.contourArea`` of an outer contour is the area enclosed by the polygon through the centres
  of its border pixels. Over the 2x2 windows ("quads") of pixel centres that polygon covers a full
  cell where all four pixels are in the component or enclosed by it, half a cell where three are,
  and nothing otherwise. For a component without holes that is ``Q4 + Q3 / 2`` of the component
  itself, a sum of per-quad terms; so is its Euler number (Gray's bit quads for 8-connectivity,
  ``(Q1 - Q3 - 2 QD) / 4``), which counts ``1 - holes``. Every quad's foreground pixels are
  8-adjacent to each other, hence in one component, so both sums split exactly over components
  and are carried through the union-find. A component with holes encloses more than its own quads:
  its area is only bounded, between its own quad area and its centres' bounding box.
- A hole contour never encloses more area than the outer contour of its component (it runs through
  pixels of the component, all inside the region the outer contour encloses, and a traced border
  does not cross itself) and comes after it in OpenCV's list (a parent before its children), so
  the largest contour (the first of equal areas) is always an outer one.
  Without holes at a threshold every outer contour is at the top of the tree and OpenCV lists
  them in reverse raster order of their first pixel.

Pixels are visited once, in decreasing value (raster order among equal values): after all pixels
above ``t`` are in, the union-find holds the components of ``{u > t}``. Which neighbours are
already in is decided up front in one raster pass (the 8-bit "earlier neighbour" mask), and a
lookup table says how many separate groups those neighbours form around the pixel (adjacent ring
positions touch; so do two edge neighbours around one corner), so only a pixel that may join two
components pays for more than one find. Components are numbered as they start, a visited pixel
keeps the id of its component's root at that moment, the older id survives a merge, and the
attributes (box, first pixel, quad sums) live per id.

Holes use the mirror pass: pixels in increasing value, 4-connectivity, with a flag for components
that reach the image border.

All kernels are compiled with numba (``cache=True``: the compile is paid once per machine) and
release the GIL (``nogil=True``), so threads evaluate several images at once.
"""

from __future__ import annotations

import numpy as np
from numba import njit

LEVELS = 256

# decision codes per threshold returned by the kernels
DECIDED = 0
TRACE = 1  # the largest contour is not determined by the union-find's data: trace this threshold
HOLES = 2  # a hole box might reach an IoU cut that the outer boxes miss: compute the holes' boxes

# The 8 neighbours are numbered around a ring, clockwise from the top-left: NW N NE E SE S SW W
# (bit i of a mask is ring position i; see _ring_offsets). Edge neighbours are the odd positions.
_EDGES = (1, 3, 5, 7)


def _groups(mask: int, four: bool) -> list[int]:
    """Ring positions representing the separate groups of set neighbours in ``mask``.

    8-connectivity: ring neighbours i, i+1 touch, and so do two edge neighbours around a corner.
    4-connectivity: only edge neighbours can be representatives (corners are not 4-adjacent to
    the centre), and two of them are joined through a set corner between them.
    """
    on = [(mask >> i) & 1 for i in range(8)]
    parent = list(range(8))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(8):
        links = [(i + 1) % 8]
        if not four and i in _EDGES:
            links.append((i + 2) % 8)
        for j in links:
            if on[i] and on[j]:
                parent[find(i)] = find(j)
    reps, seen = [], set()
    for i in (_EDGES if four else (*_EDGES, 0, 2, 4, 6)):
        if on[i] and find(i) not in seen:
            seen.add(find(i))
            reps.append(i)
    return reps


def _quad_deltas(mask: int) -> tuple[int, int]:
    """Change of (twice the quad area, four times the Euler number) when the centre pixel joins.

    The centre's four quads are NW (N, W, NW), NE (N, E, NE), SE (S, E, SE), SW (S, W, SW). A quad
    with k pixels in adds 2 (k = 4) or 1 (k = 3) to twice the area; to 4 x Euler it adds 1 (k = 1),
    -1 (k = 3), -2 (two diagonal pixels), 0 otherwise.
    """
    on = [(mask >> i) & 1 for i in range(8)]

    def area2(k):
        return 2 if k == 4 else (1 if k == 3 else 0)

    def euler4(k, diagonal):
        return {1: 1, 3: -1}.get(k, -2 if (k == 2 and diagonal) else 0)

    d_area = d_euler = 0
    for e1, e2, corner in ((1, 7, 0), (1, 3, 2), (5, 3, 4), (5, 7, 6)):
        before = on[e1] + on[e2] + on[corner]
        d_area += area2(before + 1) - area2(before)
        # before the centre joins, a pair is diagonal when it is the two edges; after, when it is
        # the centre and the corner
        d_euler += (euler4(before + 1, before == 1 and on[corner] == 1)
                    - euler4(before, before == 2 and on[corner] == 0))
    return d_area, d_euler


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    groups8 = np.zeros((256, 5), np.int64)  # [count, ring positions of the representatives...]
    groups4 = np.zeros((256, 5), np.int64)
    quads = np.zeros(256, np.int64)  # twice-area delta + (4 x Euler delta << 32)
    for mask in range(256):
        for table, four in ((groups8, False), (groups4, True)):
            reps = _groups(mask, four)
            table[mask, 0] = len(reps)
            table[mask, 1:1 + len(reps)] = reps
        d_area, d_euler = _quad_deltas(mask)
        quads[mask] = d_area + (d_euler << 32)
    return groups8, groups4, quads


GROUPS8, GROUPS4, QUADS = _tables()
# one load per pixel in the passes: group count in bits 0-2, first representative's ring position above
STEPS8 = GROUPS8[:, 0] | (GROUPS8[:, 1] << 3)
STEPS4 = GROUPS4[:, 0] | (GROUPS4[:, 1] << 3)


@njit(cache=True, nogil=True)
def _ring_offsets(wp):
    """Flat-index offsets of the ring positions in a padded image ``wp`` pixels wide."""
    offsets = np.empty(8, np.int64)
    offsets[0] = -wp - 1
    offsets[1] = -wp
    offsets[2] = -wp + 1
    offsets[3] = 1
    offsets[4] = wp + 1
    offsets[5] = wp
    offsets[6] = wp - 1
    offsets[7] = -1
    return offsets


@njit(cache=True, nogil=True)
def _row_divisor(wp):
    """``q // wp`` as ``(q * magic) >> 40``: exact for ``q * wp < 2**40`` (a division per pixel is slow).

    With ``magic = ceil(2**40 / wp) = 2**40 / wp + e`` (``0 <= e < 1``), ``q * magic / 2**40`` exceeds
    ``q / wp`` by less than ``q / 2**40 < 1 / wp``, which never reaches the next integer.
    """
    return np.uint64(wp), np.uint64(((1 << 40) + wp - 1) // wp), np.uint64(40)


@njit(cache=True, nogil=True)
def earlier_masks(u):
    """Per pixel (padded layout, one-pixel frame), which ring neighbours the descending pass visits first.

    The order is by decreasing value, raster order among equal values: a neighbour is earlier if it
    is higher, or equal and before in raster order. Frame pixels are never visited. The ascending
    pass (increasing value, reverse raster order among equal values) is this order reversed, so its
    mask is the complement restricted to neighbours inside the image.
    """
    h, w = u.shape
    wp = w + 2
    padded = np.full((h + 2, wp), -1, np.int16)
    for y in range(h):
        for x in range(w):
            padded[y + 1, x + 1] = u[y, x]
    masks = np.zeros((h + 2) * wp, np.uint8)
    for y in range(1, h + 1):
        above = padded[y - 1]
        row = padded[y]
        below = padded[y + 1]
        base = y * wp
        for x in range(1, w + 1):
            v = row[x]
            masks[base + x] = ((above[x - 1] >= v) | ((above[x] >= v) << 1) | ((above[x + 1] >= v) << 2)
                               | ((row[x + 1] > v) << 3) | ((below[x + 1] > v) << 4) | ((below[x] > v) << 5)
                               | ((below[x - 1] > v) << 6) | ((row[x - 1] >= v) << 7))
    return masks


@njit(cache=True, nogil=True)
def _inside(x, y, w, h):
    """Ring positions (bits) of the neighbours of (x, y) that lie inside the image."""
    bits = 0xFF
    if y == 0:
        bits &= ~0b00000111  # NW N NE
    if y == h - 1:
        bits &= ~0b01110000  # SE S SW
    if x == 0:
        bits &= ~0b11000001  # NW SW W
    if x == w - 1:
        bits &= ~0b00011100  # NE E SE
    return bits


@njit(cache=True, nogil=True)
def sort_by_value(u):
    """Pixels by decreasing value, raster order among equal values.

    Returns:
        ``order`` (padded indices) and the value histogram.
    """
    h, w = u.shape
    wp = w + 2
    # Four bands of rows advance pixel by pixel together, each with its own histogram and write
    # cursors: neighbouring pixels mostly share a value, and one counter per value would
    # serialize them. Band j's pixels go after band j - 1's within each value, which keeps raster
    # order among equal values. Rows left over (h not a multiple of 4) belong to the last band.
    rows = h // 4
    counts = np.zeros((4, LEVELS), np.int64)
    for i in range(rows):
        a = u[i]
        b = u[i + rows]
        c = u[i + 2 * rows]
        d = u[i + 3 * rows]
        for x in range(w):
            counts[0, a[x]] += 1
            counts[1, b[x]] += 1
            counts[2, c[x]] += 1
            counts[3, d[x]] += 1
    for y in range(4 * rows, h):
        for x in range(w):
            counts[3, u[y, x]] += 1
    cursor = np.empty((4, LEVELS), np.int64)
    hist = np.empty(LEVELS, np.int64)
    start = 0
    for v in range(LEVELS - 1, -1, -1):
        total = 0
        for j in range(4):
            cursor[j, v] = start + total
            total += counts[j, v]
        hist[v] = total
        start += total
    order = np.empty(h * w, np.int32)
    for i in range(rows):
        for x in range(w):
            for j in range(4):
                y = i + j * rows
                v = u[y, x]
                k = cursor[j, v]
                order[k] = (y + 1) * wp + 1 + x
                cursor[j, v] = k + 1
    for y in range(4 * rows, h):
        for x in range(w):
            v = u[y, x]
            k = cursor[3, v]
            order[k] = (y + 1) * wp + 1 + x
            cursor[3, v] = k + 1
    return order, hist


@njit(cache=True, nogil=True)
def _iou(x0, y0, x1, y1, gt):
    """The protocol's best IoU of one box against the ground-truth boxes (float64, inclusive pixels)."""
    best = 0.0
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    for g in range(gt.shape[0]):
        iw = min(x1, gt[g, 2]) - max(x0, gt[g, 0]) + 1
        ih = min(y1, gt[g, 3]) - max(y0, gt[g, 1]) + 1
        inter = max(0, iw) * max(0, ih)
        denominator = area + (gt[g, 2] - gt[g, 0] + 1) * (gt[g, 3] - gt[g, 1] + 1) - inter
        iou = inter / denominator if denominator > 0 else 0.0
        if iou > best:
            best = iou
    return best


@njit(cache=True, nogil=True)
def _inside_bound(x0, y0, x1, y1, gt):
    """Upper bound of the IoU of any box inside this one: ``max |B & G| / |G|`` (see box_fast)."""
    best = 0.0
    for g in range(gt.shape[0]):
        iw = min(x1, gt[g, 2]) - max(x0, gt[g, 0]) + 1
        ih = min(y1, gt[g, 3]) - max(y0, gt[g, 1]) + 1
        bound = max(0, iw) * max(0, ih) / ((gt[g, 2] - gt[g, 0] + 1) * (gt[g, 3] - gt[g, 1] + 1))
        if bound > best:
            best = bound
    return best


@njit(cache=True, nogil=True)
def _band(iou, cuts):
    """How many IoU cuts ``iou`` reaches (``iou >= cut``); equal bands give equal answers."""
    band = 0
    for c in range(cuts.shape[0]):
        if iou >= cuts[c]:
            band += 1
    return band


@njit(cache=True, nogil=True)
def outer_levels(order, hist, masks, shape, need, gt, cuts, modes, groups, steps, quads, records):
    """Per threshold t with ``need[t]``: the protocol's best IoU from the outer contours' boxes.

    Args:
        order, hist: :func:`sort_by_value` of the map.
        masks: :func:`earlier_masks` of the map.
        shape: ``(H, W)``.
        need: bool ``[256]``: thresholds to decide (each must have a non-empty foreground).
        gt: int64 ``[G, 4]`` ground-truth boxes.
        cuts: float64 IoU cuts (T / 100); with both rules, every rule's cuts (a finer set of
            bands only makes the decisions more cautious).
        modes: 1 = MaxBoxAcc's largest contour, 2 = MaxBoxAccV2's every contour, 3 = both.
        groups, steps, quads: :data:`GROUPS8`, :data:`STEPS8` and :data:`QUADS`.
        records: int64 ``[R, 8]`` array that receives, for tests, every component at every needed
            threshold as rows ``(t, x0, y0, x1, y1, twice quad area, 4 x Euler number, first
            pixel's raster index)`` up to its capacity (``R = 0``: nothing is recorded).

    Returns:
        ``best`` float64 ``[2, 256]`` (the best IoU, meaningful where decided; row 0 the largest
        contour's rule, row 1 every contour's), ``status`` int8 ``[2, 256]``: :data:`DECIDED`,
        :data:`TRACE` (the largest contour is not determined) or :data:`HOLES` (holes' boxes are
        still to be scored), and how many components there were to record (more than ``R``
        means some were left out).
    """
    h, w = shape
    wp = w + 2
    n = h * w
    best = np.full((2, LEVELS), -1.0)
    status = np.zeros((2, LEVELS), np.int8)
    kept = 0
    lowest = -1
    for t in range(LEVELS):
        if need[t]:
            lowest = t
            break
    if lowest < 0:
        return best, status, kept
    # Indices are unsigned: numba then skips its negative-index wrap-around test on every access.
    # Ring offsets wrap modulo 2**64, so adding one to an index still lands on the neighbour.
    offsets = _ring_offsets(wp).astype(np.uint64)
    one = np.uint64(1)
    padded_width, magic, shift = _row_divisor(wp)
    label = np.empty((h + 2) * wp, np.uint64)  # component id of a visited pixel (its root then)
    parent = np.empty(n + 1, np.uint64)  # union-find over component ids
    x0 = np.empty(n + 1, np.int64)
    y0 = np.empty(n + 1, np.int64)
    x1 = np.empty(n + 1, np.int64)
    y1 = np.empty(n + 1, np.int64)
    first = np.empty(n + 1, np.int64)  # the component's first pixel in raster order (padded index)
    packed = np.zeros(n + 1, np.int64)  # twice the quad area + (4 x Euler << 32)
    live = np.empty(n, np.int64)  # ids of the current roots
    slot = np.empty(n + 1, np.uint64)  # position of a root in ``live``
    count = np.uint64(0)
    ids = one  # id 0 is a scratch root for the sum cache below
    # The quad sums of the root that the last pixels joined are accumulated in a register and
    # added to it when another root comes up, before a merge and at each threshold. (Bounding
    # boxes are updated in place: a pixel rarely extends one, so those stores are rare.)
    current = np.uint64(0)
    pending = 0
    k = np.uint64(0)
    for v in range(LEVELS - 1, lowest, -1):
        end = k + np.uint64(hist[v])
        while k < end:
            q = np.uint64(order[k])
            k += one
            m = np.uint64(masks[q])
            step = steps[m]
            ng = step & 7
            row = (q * magic) >> shift
            y = np.int64(row) - 1
            x = np.int64(q - row * padded_width) - 1
            if ng == 0:  # a new component
                r = ids
                ids += one
                parent[r] = r
                x0[r] = x
                y0[r] = y
                x1[r] = x
                y1[r] = y
                first[r] = np.int64(q)
                packed[r] = 0
                live[count] = np.int64(r)
                slot[r] = count
                count += one
            else:
                r = label[q + offsets[step >> 3]]
                while parent[r] != r:
                    r = parent[r]
                if ng > 1:
                    packed[current] += pending
                    pending = 0
                    for g in range(1, ng):
                        r2 = label[q + offsets[groups[m, 1 + g]]]
                        while parent[r2] != r2:
                            r2 = parent[r2]
                        if r2 != r:
                            if r2 < r:  # the older id survives
                                r, r2 = r2, r
                            parent[r2] = r
                            x0[r] = min(x0[r], x0[r2])
                            y0[r] = min(y0[r], y0[r2])
                            x1[r] = max(x1[r], x1[r2])
                            y1[r] = max(y1[r], y1[r2])
                            first[r] = min(first[r], first[r2])
                            packed[r] += packed[r2]
                            count -= one
                            moved = live[count]
                            live[slot[r2]] = moved
                            slot[np.uint64(moved)] = slot[r2]
                if x < x0[r]:
                    x0[r] = x
                if x > x1[r]:
                    x1[r] = x
                if y <= y0[r]:  # the first pixel is in the top row
                    if y < y0[r]:
                        y0[r] = y
                        first[r] = np.int64(q)
                    elif np.int64(q) < first[r]:
                        first[r] = np.int64(q)
                if y > y1[r]:
                    y1[r] = y
            if r != current:
                packed[current] += pending
                pending = 0
                current = r
            label[q] = r
            pending += quads[m]
        t = v - 1
        if not need[t]:
            continue
        packed[current] += pending
        pending = 0
        alive = live[:np.int64(count)]
        if modes & 1:
            best[0, t], status[0, t] = _decide_single(alive, x0, y0, x1, y1, first, packed, gt, cuts, w, h)
        if modes & 2:
            best[1, t], status[1, t] = _decide_multi(alive, x0, y0, x1, y1, packed, gt, cuts, w, h)
        for r in alive:
            if kept < records.shape[0]:
                f = first[r]
                records[kept, 0] = t
                records[kept, 1] = x0[r]
                records[kept, 2] = y0[r]
                records[kept, 3] = x1[r]
                records[kept, 4] = y1[r]
                records[kept, 5] = packed[r] & 0xFFFFFFFF
                records[kept, 6] = packed[r] >> 32
                records[kept, 7] = (f // wp - 1) * w + f % wp - 1
            kept += 1
    return best, status, kept


@njit(cache=True, nogil=True)
def _decide_multi(live, x0, y0, x1, y1, packed, gt, cuts, w, h):
    """MaxBoxAccV2 at one threshold: the best outer box's IoU, and whether holes may beat it."""
    top = -1.0
    holey_bound = -1.0
    for r in live:
        bx1 = min(x1[r] + 1, w - 1)
        by1 = min(y1[r] + 1, h - 1)
        iou = _iou(x0[r], y0[r], bx1, by1, gt)
        if iou > top:
            top = iou
        if (packed[r] >> 32) < 4:  # Euler number < 1: the component has holes
            bound = _inside_bound(x0[r], y0[r], bx1, by1, gt)
            if bound > holey_bound:
                holey_bound = bound
    if _band(holey_bound, cuts) > _band(top, cuts):
        return top, HOLES
    return top, DECIDED


@njit(cache=True, nogil=True)
def _decide_single(live, x0, y0, x1, y1, first, packed, gt, cuts, w, h):
    """MaxBoxAcc at one threshold: the IoU of the largest outer contour's box, if determined."""
    if len(live) == 1:
        r = live[0]
        return _iou(x0[r], y0[r], min(x1[r] + 1, w - 1), min(y1[r] + 1, h - 1), gt), DECIDED
    # Several components: the largest outer contour. Twice its area is exact for a component
    # without holes (its own quad area) and otherwise within [own quad area, twice the area of its
    # centres' bounding box].
    largest_low = -1
    any_holes = False
    for r in live:
        low = packed[r] & 0xFFFFFFFF
        if low > largest_low:
            largest_low = low
        if (packed[r] >> 32) < 4:
            any_holes = True
    # candidates: components whose area may reach the largest lower bound
    band_min = cuts.shape[0] + 1
    band_max = -1
    candidates = 0
    exact = True
    tied = 0
    chosen = -1
    for r in live:
        low = packed[r] & 0xFFFFFFFF
        high = low if (packed[r] >> 32) == 4 else 2 * (x1[r] - x0[r]) * (y1[r] - y0[r])
        if high < largest_low:
            continue
        candidates += 1
        if high != low:
            exact = False
        band = _band(_iou(x0[r], y0[r], min(x1[r] + 1, w - 1), min(y1[r] + 1, h - 1), gt), cuts)
        band_min = min(band_min, band)
        band_max = max(band_max, band)
        if low == largest_low:
            tied += 1
            # of equal areas, OpenCV lists the component found last (in raster order) first
            if chosen < 0 or first[r] > first[chosen]:
                chosen = r
    # decided: one candidate; or all candidates score alike; or exact areas with one largest; or
    # exact equal areas at a threshold without holes (every contour at the top of the tree)
    if candidates == 1 or band_min == band_max or (exact and (tied == 1 or not any_holes)):
        r = chosen
        return _iou(x0[r], y0[r], min(x1[r] + 1, w - 1), min(y1[r] + 1, h - 1), gt), DECIDED
    return -1.0, TRACE


@njit(cache=True, nogil=True)
def hole_levels(order, hist, masks, shape, need, gt, groups, steps, records):
    """Per threshold t with ``need[t]``: the best IoU of the hole contours' boxes (-1 if none).

    Holes of ``{u > t}`` are the 4-connected components of ``{u <= t}`` that do not reach the image
    border; the box of a hole with pixel bounding box ``(x0, y0, x1, y1)`` is the protocol's box of
    its contour, ``(x0 - 1, y0 - 1, min(x1 + 2, W - 1), min(y1 + 2, H - 1))``.

    Args:
        order, hist: :func:`sort_by_value` of the map (visited here from the end).
        masks: :func:`earlier_masks` of the map (the descending pass's; complemented here).
        shape: ``(H, W)``.
        need: bool ``[256]``.
        gt: int64 ``[G, 4]`` ground-truth boxes.
        groups, steps: :data:`GROUPS4` and :data:`STEPS4`.
        records: int64 ``[R, 5]`` array that receives, for tests, every hole at every needed
            threshold as rows ``(t, x0, y0, x1, y1)`` (its pixel bounding box) up to its capacity.

    Returns:
        ``best`` float64 ``[256]`` and how many holes there were to record.
    """
    h, w = shape
    wp = w + 2
    n = h * w
    best = np.full(LEVELS, -1.0)
    kept = 0
    highest = -1
    for t in range(LEVELS - 1, -1, -1):
        if need[t]:
            highest = t
            break
    if highest < 0:
        return best, kept
    offsets = _ring_offsets(wp).astype(np.uint64)
    one = np.uint64(1)
    padded_width, magic, shift = _row_divisor(wp)
    label = np.empty((h + 2) * wp, np.uint64)
    parent = np.empty(n, np.uint64)
    x0 = np.empty(n, np.int64)
    y0 = np.empty(n, np.int64)
    x1 = np.empty(n, np.int64)
    y1 = np.empty(n, np.int64)
    border = np.empty(n, np.bool_)
    live = np.empty(n, np.int64)
    slot = np.empty(n, np.uint64)
    count = np.uint64(0)
    ids = np.uint64(0)
    k = n  # increasing value, reverse raster order among equal values: the sorted order reversed
    for v in range(highest + 1):
        end = k - hist[v]
        while k > end:
            k -= 1
            q = np.uint64(order[k])
            row = (q * magic) >> shift
            y = np.int64(row) - 1
            x = np.int64(q - row * padded_width) - 1
            edge = x == 0 or y == 0 or x == w - 1 or y == h - 1
            m = np.uint64(~masks[q] & (_inside(x, y, w, h) if edge else 0xFF))
            step = steps[m]
            ng = step & 7
            if ng == 0:
                r = ids
                ids += one
                parent[r] = r
                x0[r] = x
                y0[r] = y
                x1[r] = x
                y1[r] = y
                border[r] = edge
                live[count] = np.int64(r)
                slot[r] = count
                count += one
            else:
                r = label[q + offsets[step >> 3]]
                while parent[r] != r:
                    r = parent[r]
                for g in range(1, ng):
                    r2 = label[q + offsets[groups[m, 1 + g]]]
                    while parent[r2] != r2:
                        r2 = parent[r2]
                    if r2 != r:
                        if r2 < r:
                            r, r2 = r2, r
                        parent[r2] = r
                        x0[r] = min(x0[r], x0[r2])
                        y0[r] = min(y0[r], y0[r2])
                        x1[r] = max(x1[r], x1[r2])
                        y1[r] = max(y1[r], y1[r2])
                        border[r] = border[r] or border[r2]
                        count -= one
                        moved = live[count]
                        live[slot[r2]] = moved
                        slot[np.uint64(moved)] = slot[r2]
                if edge:
                    border[r] = True
                elif not border[r]:  # a box is only ever read for a hole, never for the border's
                    if x < x0[r]:
                        x0[r] = x
                    if x > x1[r]:
                        x1[r] = x
                    if y < y0[r]:
                        y0[r] = y
                    if y > y1[r]:
                        y1[r] = y
            label[q] = r
        if not need[v]:
            continue
        top = -1.0
        for r in live[:np.int64(count)]:
            if border[r]:
                continue
            iou = _iou(x0[r] - 1, y0[r] - 1, min(x1[r] + 2, w - 1), min(y1[r] + 2, h - 1), gt)
            if iou > top:
                top = iou
            if kept < records.shape[0]:
                records[kept, 0] = v
                records[kept, 1] = x0[r]
                records[kept, 2] = y0[r]
                records[kept, 3] = x1[r]
                records[kept, 4] = y1[r]
            kept += 1
        best[v] = top
    return best, kept


@njit(cache=True, nogil=True)
def needed_levels(u, taus):
    """The integer threshold of each CAM threshold, and which of them the passes must decide.

    Returns:
        ``levels`` int64 (``int(tau * max(u))``, truncated toward zero and clipped to [-1, 255]),
        ``need`` bool ``[256]`` (the levels with a non-empty foreground: ``0 <= t < max``) and
        ``max(u)``.
    """
    umax = 0
    for value in u.ravel():
        umax = max(umax, np.int64(value))
    levels = np.empty(len(taus), np.int64)
    need = np.zeros(LEVELS, np.bool_)
    for j in range(len(taus)):
        t = min(max(np.int64(taus[j] * np.float64(umax)), -1), LEVELS - 1)
        levels[j] = t
        if 0 <= t < umax:
            need[t] = True
    return levels, need, umax


@njit(cache=True, nogil=True)
def answers(levels, best, status, umax, shape, gt, cuts):
    """``[len(cuts), len(levels)]`` booleans ``iou >= cut`` per CAM threshold (traced ones unset).

    ``t < 0`` keeps every pixel (one component: the whole image); ``t >= max`` keeps none, the
    protocol's box ``(0, 0, 0, 0)``.
    """
    h, w = shape
    whole = _iou(0, 0, w - 1, h - 1, gt)
    empty = _iou(0, 0, 0, 0, gt)
    correct = np.zeros((len(cuts), len(levels)), np.bool_)
    for j in range(len(levels)):
        t = levels[j]
        if t < 0:
            iou = whole
        elif t >= umax:
            iou = empty
        elif status[t] == TRACE:
            continue
        else:
            iou = best[t]
        for c in range(len(cuts)):
            correct[c, j] = iou >= cuts[c]
    return correct
