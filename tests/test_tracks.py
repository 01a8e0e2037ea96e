"""Following faces through a video's frames by their boxes' overlap."""

from __future__ import annotations

import numpy as np

from fer_mlflow.serving.tracks import iou, track


def test_iou_of_boxes_given_as_x_y_w_h():
    overlap = iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 10, 10], [20, 20, 5, 5]]))
    np.testing.assert_allclose(overlap, [[1.0, 50 / 150, 0.0]])


def test_two_faces_moving_apart_keep_their_ids_whatever_order_they_are_found_in():
    frames, left_at = [], []
    for step in range(8):
        left, right = [100 - 8 * step, 50, 60, 60], [180 + 8 * step, 60, 60, 60]
        left_at.append(step % 2)  # where the left face is in the frame's list: the order varies
        frames.append(np.array([right, left] if step % 2 else [left, right]))
    ids = track(frames)
    left_ids = [each[at] for each, at in zip(ids, left_at)]
    right_ids = [each[1 - at] for each, at in zip(ids, left_at)]
    assert len(set(left_ids)) == 1 and len(set(right_ids)) == 1 and left_ids[0] != right_ids[0]
    assert {left_ids[0], right_ids[0]} == {0, 1}


def test_a_face_missed_for_a_frame_keeps_its_id_and_one_gone_longer_gets_a_new_one():
    box = np.array([[10, 10, 40, 40]])
    none = np.zeros((0, 4))
    assert [list(each) for each in track([box, none, box, none, none, none, box])] == \
        [[0], [], [0], [], [], [], [1]]


def test_a_face_that_jumps_away_is_a_new_track():
    assert [list(each) for each in track([np.array([[0, 0, 40, 40]]), np.array([[200, 0, 40, 40]])])] == [[0], [1]]


def test_a_face_moving_more_than_half_its_width_between_sampled_frames_keeps_its_id():
    # 40 pixels a frame for a 60-pixel box: consecutive boxes overlap by IoU 0.2.
    frames = [np.array([[20 + 40 * step, 100, 60, 60]]) for step in range(10)]
    assert [int(each[0]) for each in track(frames)] == [0] * 10


def test_a_face_that_speeds_up_is_found_where_its_last_move_predicts():
    # 30 pixels, then 55 a frame: 55 from the last box is IoU 0.04, 25 from the predicted one 0.41.
    frames = [np.array([[x, 100, 60, 60]]) for x in (0, 30, 85, 140, 195, 250)]
    assert [int(each[0]) for each in track(frames)] == [0] * 6
