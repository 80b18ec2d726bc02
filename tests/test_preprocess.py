"""The offline control-image preprocessors: canny finds a shape's outline (thin, closed, nowhere else) with
cv2.Canny's hysteresis, scribble draws dark strokes as white lines, tile and blur keep flat images flat; the
command writes a PNG and refuses what it must not do in one line."""

import numpy as np
import pytest
from PIL import Image
from test_robustness import one_line_error

from sampling.preprocess import blur, canny, main, scribble, tile


def square(size=64, inner=(16, 48), value=255, background=0):
    array = np.full((size, size, 3), background, np.uint8)
    array[inner[0]:inner[1], inner[0]:inner[1]] = value
    return Image.fromarray(array)


def white(image):
    return np.asarray(image)[..., 0] > 0


def test_canny_finds_a_squares_outline_and_nothing_else():
    edges = white(canny(square()))
    ys, xs = np.nonzero(edges)
    assert edges.any() and ys.min() >= 14 and ys.max() <= 48 and xs.min() >= 14 and xs.max() <= 48
    assert not edges[20:44, 20:44].any(), "edges inside the flat square"
    for row in range(20, 44):  # each side crossed once or twice (the gradient straddles the step): thin
        assert 1 <= edges[row, :32].sum() <= 2 and 1 <= edges[row, 32:].sum() <= 2


def test_canny_hysteresis_keeps_weak_edges_only_where_they_touch_strong_ones():
    array = np.zeros((64, 64, 3), np.uint8)
    array[8:56, 8:32] = 200  # a strong step (Sobel magnitude 4 x 200 = 800)
    array[8:56, 32:56] = 215  # a weak step of 15 (magnitude 60) continuing it
    array[30:34, 60:62] = 15  # an isolated weak blob
    edges = white(canny(Image.fromarray(array), low=50, high=500))
    assert edges[20:40, 30:34].any(), "the weak edge touching the strong outline was dropped"
    assert not edges[25:40, 57:64].any(), "an isolated weak edge was kept"
    assert white(canny(Image.fromarray(array), low=50, high=5000)).sum() == 0  # nothing strong: nothing at all


def test_scribble_draws_dark_strokes():
    array = np.full((64, 64, 3), 255, np.uint8)
    array[30:33, 8:56] = 0  # a dark horizontal stroke
    lines = white(scribble(Image.fromarray(array)))
    assert lines[30:33, 10:54].mean() > 0.8 and not lines[:20].any() and not lines[45:].any()
    assert not white(scribble(square(value=128, background=128))).any()


@pytest.mark.parametrize("make", [lambda im: tile(im, 4), lambda im: blur(im, 2)], ids=["tile", "blur"])
def test_tile_and_blur_keep_size_and_flat_images(make):
    flat = square(value=90, background=90)
    out = make(flat)
    assert out.size == flat.size and np.abs(np.asarray(out, np.int16) - 90).max() <= 1
    sharp = square()
    assert np.asarray(make(sharp), np.float32).std() < np.asarray(sharp, np.float32).std()


def test_command(tmp_path, capsys):
    square().save(tmp_path / "in.png")
    assert main(["canny", str(tmp_path / "in.png"), str(tmp_path / "edges.png")]) == 0
    assert white(Image.open(tmp_path / "edges.png")).any()
    capsys.readouterr()
    for argv, fragment in [(["canny", tmp_path / "in.png", tmp_path / "edges.png"], "already exists"),
                           (["canny", tmp_path / "in.png", tmp_path / "x.png", "--low", 300], "--low <= --high"),
                           (["blur", tmp_path / "missing.png", tmp_path / "y.png"], "missing.png")]:
        code = main(list(map(str, argv)))
        one_line_error(capsys.readouterr().err, code, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edges.png", "in.png"]
