"""The page generator: deterministic, exact ground truth, loadable (no models)."""
import io

from PIL import Image

from services.ocr.pages import generate_page, load_pages, write_pages


def test_same_seed_same_page_different_seed_different_page():
    a, b = generate_page(0, 3), generate_page(0, 3)
    assert a == b
    assert generate_page(1, 3).png != a.png
    assert generate_page(0, 4).png != a.png


def test_page_shape_and_truth_boxes_inside_the_page():
    page = generate_page(7, 0)
    img = Image.open(io.BytesIO(page.png))
    assert img.size == (page.width, page.height)
    assert 5 <= len(page.lines) <= 24          # 5-8 rows of 1-3 phrases
    for line in page.lines:
        assert line.text and line.text == line.text.strip()
        xs, ys = line.box[0::2], line.box[1::2]
        assert 0 <= min(xs) < max(xs) <= page.width and 0 <= min(ys) < max(ys) <= page.height


def test_mean_lines_per_page_is_about_eleven():
    n = [len(generate_page(0, i).lines) for i in range(20)]
    assert 8 <= sum(n) / len(n) <= 14


def test_write_and_load_round_trip(tmp_path):
    pages = write_pages(tmp_path, 3, seed=5, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ground_truth.json", "p000.png", "p001.png", "p002.png"]
    assert load_pages(tmp_path) == pages
