"""Tests of wfnet.explain: the filter-map selection rule and that every figure is written as a readable PNG."""
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from wfnet import explain as E

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _alpha_shared():
    """4 classes x 12 channels (all gates open at 3), with closed channels chosen so that channels 2 and 5 are in
    the top-3 of classes 0 and 1, channel 9 in those of classes 2 and 3, and every other closed channel in one."""
    a = torch.full((4, 12), 3.0)
    a[0, [2, 5, 7]] = torch.tensor([-3.0, -2.0, -1.0])
    a[1, [2, 5, 8]] = torch.tensor([-1.0, -3.0, -2.0])
    a[2, [9, 0, 1]] = torch.tensor([-3.0, -2.0, -1.0])
    a[3, [9, 3, 4]] = torch.tensor([-2.0, -3.0, -1.0])
    return a


def _read_png(path):
    assert path.read_bytes()[:8] == PNG
    return mpimg.imread(path)


def test_relevance_is_one_minus_sigmoid():
    a = torch.tensor([[0.0, 3.0, -3.0]])
    torch.testing.assert_close(E.relevance(a), 1 - torch.sigmoid(a))


def test_filter_map_keeps_channels_shared_by_two_classes():
    data = E.filter_map_data(_alpha_shared(), top_k=3, min_classes=2)
    assert data["channels"] == [2, 5, 9]
    assert data["top"][0] == [2, 5, 7] and set(data["top"][3]) == {3, 9, 4}
    expected = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=bool)
    assert (data["member"] == expected).all()
    rel = 1 - torch.sigmoid(_alpha_shared())
    np.testing.assert_allclose(data["relevance"], rel[:, [2, 5, 9]].numpy(), rtol=1e-6)
    # restricted to classes 0 and 2 nothing is shared by two of them
    assert E.filter_map_data(_alpha_shared(), 3, 2, classes=[0, 2])["channels"] == []
    # top_k larger than the layer is clipped to its width
    assert len(E.filter_map_data(_alpha_shared()[:, :4], top_k=10)["top"][0]) == 4


def test_filter_map_rejects_bad_input():
    with pytest.raises(ValueError, match="num_classes, channels"):
        E.filter_map_data(torch.zeros(3))
    with pytest.raises(ValueError, match="classes"):
        E.filter_map_data(torch.zeros(2, 3), classes=[5])


def test_plot_filter_map_writes_png(tmp_path):
    names = ["zero", "one", "two", "three"]
    data = E.plot_filter_map(_alpha_shared(), names, tmp_path / "fm.png", "features.0", top_k=3)
    img = _read_png(tmp_path / "fm.png")
    assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0.05  # drawn, not blank
    assert data["channels"] == [2, 5, 9]
    # no shared channel: the union is drawn instead of an empty map
    E.plot_filter_map(_alpha_shared(), names, tmp_path / "fm2.png", "x", top_k=3, classes=[0, 2])
    assert _read_png(tmp_path / "fm2.png").std() > 0.05


def test_plot_gate_heatmaps_grid_of_layers(tmp_path):
    torch.manual_seed(0)
    alphas = {f"layer{i}": torch.randn(10, 8 * (i + 1)) * 3 for i in range(6)}
    E.plot_gate_heatmaps(alphas, [f"class {c}" for c in range(10)], tmp_path / "h.png")
    img = _read_png(tmp_path / "h.png")
    assert img.shape[1] > img.shape[0] > 300  # a 4 x 2 grid: wider than tall
    with pytest.raises(ValueError):
        E.plot_gate_heatmaps({}, [], tmp_path / "empty.png")


def test_plot_insertion_deletion(tmp_path):
    steps = [0.0, 0.5, 1.0]
    per_class = {c: {"insertion": {"steps": steps, "curve": [0.1 * c, 0.6, 1.0], "auc": 0.5},
                     "deletion": {"steps": steps, "curve": [1.0, 0.2, 0.0], "auc": 0.35}} for c in range(3)}
    E.plot_insertion_deletion(per_class, ["a", "b", "c"], tmp_path / "insdel.png")
    assert _read_png(tmp_path / "insdel.png").std() > 0.05
    with pytest.raises(ValueError):
        E.plot_insertion_deletion({}, [], tmp_path / "none.png")
