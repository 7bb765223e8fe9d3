"""DB post-processing, reading order and crops on synthetic inputs (no models)."""
import cv2
import numpy as np
import pytest

from services.ocr.geometry import DBParams, crop_quad, db_boxes, order_points, reading_order, unclip_rect


def _prob_map(h=100, w=200, rects=((40, 30, 160, 50),), value=0.9):
    prob = np.zeros((h, w), np.float32)
    for x0, y0, x1, y1 in rects:
        prob[y0:y1, x0:x1] = value
    return prob


def test_known_rectangle_comes_back_with_unclipped_box():
    found = db_boxes(_prob_map(), DBParams(thresh=0.3, box_thresh=0.6, unclip_ratio=1.5))
    assert len(found) == 1
    box, score = found[0]
    # pixels 40..159 x 30..49: the contour through the pixel centres has a 119 x 19
    # minAreaRect, so the unclip distance is d = area * ratio / perimeter
    # = 119 * 19 * 1.5 / 276 = 12.29 and the box is 40..159 x 30..49 grown by d on every side.
    d = 119 * 19 * 1.5 / (2 * (119 + 19))
    expected = np.array([[40 - d, 30 - d], [159 + d, 30 - d], [159 + d, 49 + d], [40 - d, 49 + d]])
    np.testing.assert_allclose(box, expected, atol=1e-3)   # [[27.71, 17.71], [171.29, 17.71], ...]
    assert score == pytest.approx(0.9, abs=1e-3)


def test_low_score_and_tiny_boxes_are_dropped():
    prob = _prob_map(rects=((40, 30, 160, 50),), value=0.5)
    assert db_boxes(prob, DBParams(thresh=0.3, box_thresh=0.6)) == []      # mean 0.5 < 0.6
    tiny = _prob_map(rects=((10, 10, 12, 12),))
    assert db_boxes(tiny, DBParams(min_size=3)) == []                      # 2 px < 3 px


def test_boxes_are_clipped_to_the_map():
    prob = _prob_map(rects=((0, 0, 50, 10),))
    (box, _), = db_boxes(prob, DBParams(unclip_ratio=2.0))
    assert box.min() >= 0 and box[:, 0].max() <= 200 and box[:, 1].max() <= 100


def test_rotated_rectangle_is_found_with_its_angle():
    prob = np.zeros((200, 200), np.float32)
    pts = cv2.boxPoints(((100, 100), (120, 20), 20.0)).astype(np.int32)
    cv2.fillPoly(prob, [pts], 1.0)
    (box, _), = db_boxes(prob, DBParams(unclip_ratio=0.0))
    top_edge = box[1] - box[0]
    assert np.degrees(np.arctan2(top_edge[1], top_edge[0])) == pytest.approx(20.0, abs=1.5)


def test_unclip_rect_adds_the_distance_on_every_side():
    (c, (w, h), a) = unclip_rect(((0, 0), (100, 10), 0), 2.0)
    d = 100 * 10 * 2.0 / 220                      # = 9.09
    assert (w, h) == pytest.approx((100 + 2 * d, 10 + 2 * d))


def test_order_points_is_clockwise_from_top_left():
    shuffled = np.array([[10, 20], [0, 0], [10, 0], [0, 20]], np.float32)
    np.testing.assert_array_equal(order_points(shuffled), [[0, 0], [10, 0], [10, 20], [0, 20]])


def _rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


def test_reading_order_rows_then_columns():
    boxes = [_rect(300, 52, 400, 72),   # row 2, right (slightly lower than its neighbour)
             _rect(10, 100, 90, 120),   # row 3
             _rect(200, 10, 300, 30),   # row 1, right
             _rect(10, 50, 100, 70),    # row 2, left
             _rect(10, 12, 100, 32)]    # row 1, left (slightly lower)
    assert reading_order(boxes) == [4, 2, 3, 0, 1]
    assert reading_order([]) == []


def test_crop_quad_is_upright_and_sized_by_the_quad():
    img = np.zeros((100, 200, 3), np.uint8)
    img[20:40, 50:150] = 255
    crop = crop_quad(img, _rect(50, 20, 150, 40))
    assert crop.shape == (20, 100, 3)
    assert crop.mean() > 250
    tall = crop_quad(img, _rect(0, 0, 20, 60))  # 60 / 20 >= 1.5: rotated to 20 x 60
    assert tall.shape == (20, 60, 3)
