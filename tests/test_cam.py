"""Class heatmaps (issue 25 point 1): Grad-CAM and Grad-CAM++ find a pasted object; the layer is found for
any network with a spatial output; `imgclf cam` writes overlays and a grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, run_cli
from PIL import Image
from torch import nn

from imgclf.cam import cam_pictures, class_maps, find_layer, spatial_layers
from imgclf.checkpoint import build_checkpoint, save_checkpoint
from imgclf.config import TrainConfig
from imgclf.errors import UserError
from imgclf.models import TutorialCNN, build_model
from imgclf.transforms import load_image

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE, SQUARE = 64, 16
MEAN, STD = [0.5] * 3, [0.25] * 3


def backgrounds(count: int, seed: int) -> list[np.ndarray]:
    """uint8 (SIDE, SIDE, 3) photos: ants and bees from the shared data (noise where it is absent)."""
    rng = np.random.default_rng(seed)
    photos = sorted((SHARED_DATA / "hymenoptera_data" / "train").glob("*/*.jpg"))
    if not photos:
        return [rng.integers(0, 200, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(count)]
    chosen = rng.choice(len(photos), size=count, replace=count > len(photos))
    return [load_image(photos[i], size=SIDE, channels=3) for i in chosen]


def pasted(picture: np.ndarray, rng) -> tuple[np.ndarray, tuple[int, int]]:
    """`picture` with a bright white square at a random place, and the square's top-left corner (row, col)."""
    r, c = (int(v) for v in rng.integers(0, SIDE - SQUARE + 1, 2))
    out = picture.copy()
    out[r : r + SQUARE, c : c + SQUARE] = 255
    return out, (r, c)


def normalised(pictures: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255
    return (x - 0.5) / 0.25


@pytest.fixture(scope="module")
def square_model() -> TutorialCNN:
    return train_square_model()


def train_square_model() -> TutorialCNN:
    """A TutorialCNN trained for a few epochs to tell photos with a pasted square (class 1) from without."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    photos = backgrounds(400, seed=1)
    pictures, labels = [], []
    for i, photo in enumerate(photos):
        pictures.append(pasted(photo, rng)[0] if i % 2 else photo)
        labels.append(i % 2)
    x, y = normalised(pictures), torch.tensor(labels)
    model = TutorialCNN(num_classes=2, in_channels=3, img_size=SIDE)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(6):
        for batch in torch.randperm(len(x)).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_the_hottest_place_lies_inside_the_pasted_square(square_model, method):
    rng = np.random.default_rng(7)
    cases = [pasted(photo, rng) for photo in backgrounds(12, seed=99)]
    x = normalised([picture for picture, _ in cases])
    assert (square_model(x).argmax(1) == 1).float().mean() >= 0.9  # it learnt the task
    maps, chosen, _ = class_maps(square_model, find_layer(square_model, x[:1]), x, torch.ones(len(x), dtype=torch.long),
                                 method)
    assert maps.shape == (len(x), SIDE, SIDE) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    inside = 0
    for heat, (_, (r, c)) in zip(maps, cases, strict=True):
        hot_r, hot_c = divmod(int(heat.argmax()), SIDE)
        inside += r <= hot_r < r + SQUARE and c <= hot_c < c + SQUARE
    assert inside >= 11, f"{inside} of {len(cases)} heatmaps peak inside the square"


def test_the_layer_is_found_for_any_network():
    x = torch.zeros(1, 3, 64, 64)
    assert find_layer(TutorialCNN(2, 3, 64).eval(), x) == "features"
    assert find_layer(build_model("resnet18", num_classes=2, in_channels=3, img_size=64).eval(), x) == "layer4"
    names = [name for name, _ in spatial_layers(TutorialCNN(2, 3, 64).eval(), x)]
    assert names[-1] == "features" and "features.0" in names
    with pytest.raises(UserError, match="--layer nope"):
        find_layer(TutorialCNN(2, 3, 64).eval(), x, "nope")
    with pytest.raises(UserError, match="no layer with a spatial"):
        find_layer(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 2)), x)


@pytest.mark.slow
def test_imgclf_cam_writes_overlays_and_a_grid(tmp_path):
    torch.manual_seed(0)
    model = TutorialCNN(num_classes=2, in_channels=3, img_size=32)
    save_checkpoint(tmp_path / "m.pt", build_checkpoint(
        model_name="tutorial_cnn", classes=["plain", "square"], channels=3, size=32, mean=MEAN, std=STD,
        config=TrainConfig().to_dict(), state={"state_dict": model.state_dict()}))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"p{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    result = cam_pictures(tmp_path / "m.pt", [str(p) for p in paths], tmp_path / "out", class_name="square",
                          method="gradcam++", device="cpu")
    assert result.layer == "features" and [label for *_, label, _ in result.pictures] == ["square"] * 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grid.png", "p0.cam.png", "p1.cam.png",
                                                                     "p2.cam.png"]
    assert Image.open(tmp_path / "out" / "p0.cam.png").size[0] > 2 * 224  # enlarged, picture and overlay
    done = run_cli("cam", tmp_path / "m.pt", paths[0], "--class", "nope", "--out", tmp_path / "o2")
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1 and "--class" in done.stderr
    done = run_cli("cam", tmp_path / "m.pt", paths[0], tmp_path / "missing.png", "--out", tmp_path / "o3",
                   "--device", "cpu")
    assert done.returncode == 1, done.stderr  # EXIT_PARTIAL: the others were drawn
    assert (tmp_path / "o3" / "p0.cam.png").is_file() and "missing.png" in done.stderr


@pytest.mark.slow
def test_mistakes_get_their_heatmaps():
    from imgclf.cache import Split
    from imgclf.report import mistake_overlays, mistakes_figure
    from imgclf.transforms import BatchTransform

    torch.manual_seed(0)
    model = TutorialCNN(num_classes=2, in_channels=3, img_size=32).eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    split = Split(images, torch.tensor([0, 0, 0, 0, 1]))
    transform = BatchTransform(tuple(MEAN), tuple(STD))
    overlays = mistake_overlays(model, split, transform, torch.device("cpu"), [3, 1])
    assert [o.shape for o in overlays] == [(3, 32, 32)] * 2 and overlays[0].dtype == np.uint8
    assert all(p.grad is None for p in model.parameters())  # the weights' gradients are left alone
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.05, 0.95], [0.7, 0.3]])
    explain = lambda indices: mistake_overlays(model, split, transform, torch.device("cpu"), indices)  # noqa: E731
    fig = mistakes_figure(probs, split, ["a", "b"], explain=explain)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[:2] == ["true: a\npred: b 95%", "Grad-CAM of\nb"] and len(texts) == 8
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)).eval()  # nothing spatial: no heatmaps
    assert mistake_overlays(flat, split, transform, torch.device("cpu"), [3]) is None
