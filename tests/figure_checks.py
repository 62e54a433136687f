"""Checks shared by the figure tests: exact pixel size, and panels that are neither blank nor alike."""

from pathlib import Path

import numpy as np
from PIL import Image

MIN_PANEL_STD = 8.0
"""Grey-level standard deviation (0..255) below which a panel counts as blank."""
MIN_PANEL_DIFFERENCE = 4.0
"""Mean absolute grey-level difference below which two panels count as the same picture."""


def read_grey(path: Path) -> np.ndarray:
    """A PNG as a (rows, columns) float array of grey levels 0..255."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=float)


def assert_size(path: Path, width: int, height: int) -> np.ndarray:
    pixels = read_grey(path)
    assert pixels.shape == (height, width), f"{path}: {pixels.shape[::-1]} instead of {(width, height)}"
    return pixels


def assert_panels_differ(pixels: np.ndarray, rows: int, columns: int, right: float = 1.0) -> None:
    """Split the image (up to the fraction ``right`` of its width) into rows x columns cells:
    each must vary, and the cells of a row must differ from each other."""
    usable = pixels[:, : int(pixels.shape[1] * right)]
    height, width = usable.shape[0] // rows, usable.shape[1] // columns
    for row in range(rows):
        cells = [usable[row * height:(row + 1) * height, col * width:(col + 1) * width] for col in range(columns)]
        for cell in cells:
            assert cell.std() > MIN_PANEL_STD, "blank panel"
        for i in range(columns):
            for j in range(i + 1, columns):
                assert np.abs(cells[i] - cells[j]).mean() > MIN_PANEL_DIFFERENCE, f"panels {i} and {j} alike"
