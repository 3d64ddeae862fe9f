import numpy as np
from PIL import Image

from jaxssl.data import preview, recipes, sources


def test_write_preview_device_mode(tmp_path):
    source = sources.load_builtin("test")
    path = preview.write_preview(str(tmp_path / "sub" / "p.png"), source,
                                 recipes.get_recipe("simclr_cifar"), 32, n=4)
    grid = np.asarray(Image.open(path))
    cell, pad = 96, 4
    assert grid.shape == (4 * (cell + pad) + pad, 3 * (cell + pad) + pad, 3)
    # Column 0 holds the originals, enlarged 3x by nearest neighbour.
    first = grid[pad:pad + cell, pad:pad + cell]
    np.testing.assert_array_equal(first[::3, ::3], source.images[0])
    # The views are not the original (the recipe changed something in at least one row).
    views = [grid[pad + i * (cell + pad):pad + i * (cell + pad) + cell, pad + cell + pad:pad + 2 * cell + pad]
             for i in range(4)]
    assert any(not np.array_equal(v[::3, ::3], source.images[i]) for i, v in enumerate(views))


def test_preview_grid_undoes_normalisation():
    originals = np.zeros((1, 2, 2, 3), np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    view = (np.full((1, 2, 2, 3), 0.8) - 0.5) / 0.25  # normalised 0.8
    grid = preview.preview_grid(originals, view, view, mean, std, cell=2, pad=1)
    assert grid[1, 4, 0] == round(0.8 * 255)
