"""Classification data for ``compare``: scikit-learn's digits, or MNIST-style files.

Every loader returns images flattened to float32 rows, divided by the largest training value
(so pixel data lands in [0, 1]), and int64 labels.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DataError", "Dataset", "load_dataset"]

_IDX_DTYPES: dict[int, torch.dtype] = {
    0x08: torch.uint8,
    0x09: torch.int8,
    0x0B: torch.int16,
    0x0C: torch.int32,
    0x0D: torch.float32,
    0x0E: torch.float64,
}
"""The idx format's type codes (third byte of the magic number) to torch dtypes."""

_IMAGE_FILES = ("train-images-idx3-ubyte", "train-images.idx3-ubyte")
_TEST_IMAGE_FILES = ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte")


class DataError(ValueError):
    """A data file that is missing, unreadable or not in a supported format."""


@dataclass(frozen=True)
class Dataset:
    """A classification problem split into training and validation sets.

    Attributes
    ----------
    name : str
        Where the data came from, for reports.
    x_train, x_val : Tensor
        Float32 inputs, one flattened example per row, divided by the largest training
        value (pixels land in [0, 1]).
    y_train, y_val : Tensor
        Int64 class labels in ``range(num_classes)``.
    num_classes : int
        Number of classes (one more than the largest label).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        """Length of an input row."""
        return int(self.x_train.shape[1])


def _read_digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    return x, torch.as_tensor(digits.target, dtype=torch.int64)


def _open_maybe_gzip(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read {path}: {error}") from None


def _read_idx(path: Path) -> Tensor:
    data = _open_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path} is not an idx file (truncated header)")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = _IDX_DTYPES[data[2]]
    count = 1
    for size in shape:
        count *= size
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != header + count * itemsize:
        raise DataError(
            f"{path}: expected {count * itemsize} bytes of data for shape {shape}, got {len(data) - header}"
        )
    values = torch.frombuffer(bytearray(data[header:]), dtype=dtype)
    if itemsize > 1:  # idx stores big-endian values
        values = values.view(torch.uint8).view(-1, itemsize).flip(1).reshape(-1).view(dtype)
    return values.reshape(shape)


def _labels_path(images: Path) -> Path:
    name = images.name.removesuffix(".gz").replace("images", "labels").replace("idx3", "idx1")
    for candidate in (images.with_name(name), images.with_name(f"{name}.gz")):
        if candidate.is_file():
            return candidate
    return images.with_name(name)


def _find(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_idx_pair(images: Path) -> tuple[Tensor, Tensor]:
    x = _read_idx(images)
    labels = _labels_path(images)
    if not labels.is_file():
        raise DataError(f"found images {images} but no labels file {labels}[.gz]")
    return x, _read_idx(labels)


def _read_npz(path: Path) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: torch.as_tensor(archive[key]) for key in archive.files}
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path} as .npz: {error}") from None
    for x_key, y_key in (("x", "y"), ("x_train", "y_train")):
        if x_key in arrays and y_key in arrays:
            test = None
            if "x_test" in arrays and "y_test" in arrays:
                test = (arrays["x_test"], arrays["y_test"])
            return (arrays[x_key], arrays[y_key]), test
    raise DataError(f"{path} has arrays {sorted(arrays)}; expected 'x' and 'y' (or 'x_train' and 'y_train')")


def _read_path(path: Path) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
    if not path.exists():
        raise DataError(f"no such file or directory: {path}")
    if path.is_dir():
        images = _find(path, _IMAGE_FILES)
        if images is None:
            raise DataError(f"{path} has no train-images-idx3-ubyte[.gz] file")
        test_images = _find(path, _TEST_IMAGE_FILES)
        return _read_idx_pair(images), None if test_images is None else _read_idx_pair(test_images)
    if path.suffix == ".npz":
        return _read_npz(path)
    return _read_idx_pair(path), None


def _check_pair(x: Tensor, y: Tensor, where: str) -> tuple[Tensor, Tensor]:
    if x.dim() < 2:
        raise DataError(f"{where}: inputs must have one row per example, got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{where}: {x.shape[0]} inputs but labels of shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{where}: labels must be integers, got {y.dtype}")
    if y.numel() and int(y.min()) < 0:
        raise DataError(f"{where}: labels must be >= 0")
    return x.reshape(x.shape[0], -1), y.to(torch.int64)


def _scale(x: Tensor, top: float) -> Tensor:
    x = x.to(torch.float32)
    return x / top if top > 0 else x


def _split(x: Tensor, y: Tensor, val_fraction: float, generator: torch.Generator) -> tuple[Tensor, ...]:
    order = torch.randperm(x.shape[0], generator=generator)
    n_val = round(x.shape[0] * val_fraction)
    if n_val < 1 or n_val >= x.shape[0]:
        raise DataError(f"cannot split {x.shape[0]} examples with a validation fraction of {val_fraction}")
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def load_dataset(path: str | Path | None, *, seed: int, val_fraction: float = 0.2, limit: int | None = None) -> Dataset:
    """Load a classification dataset and split it.

    Parameters
    ----------
    path : str or Path or None
        ``None`` for scikit-learn's bundled digits (1,797 8x8 images). Else an MNIST-style
        directory (``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]``,
        optionally ``t10k-*`` files), an idx images file (the labels file is found by
        name), or an ``.npz`` file with arrays ``x`` and ``y`` (or ``x_train``/``y_train``,
        optionally ``x_test``/``y_test``).
    seed : int
        Seeds the shuffle that picks the ``limit`` subset and the validation split.
    val_fraction : float, optional
        Share of the examples held out for validation, when the data has no test set
        (``t10k-*`` files or ``x_test``/``y_test``), which is then used instead.
    limit : int, optional
        Keep a random subset of at most this many examples of the data before it is split
        (and, when there is a test set, at most this many of the test set).

    Returns
    -------
    Dataset
        Inputs divided by the largest training value (16 for digits), so pixel data
        lands in [0, 1].

    Raises
    ------
    DataError
        For missing or malformed files and for splits that leave a set empty.
    """
    generator = torch.Generator().manual_seed(seed)
    if path is None:
        name = "scikit-learn digits"
        (x, y), test = _read_digits(), None
    else:
        name = str(path)
        (x, y), test = _read_path(Path(path))
        x, y = _check_pair(x, y, name)
    if x.shape[0] < 2:
        raise DataError(f"{name}: need at least 2 examples, got {x.shape[0]}")
    if test is None:
        if limit is not None:
            x, y = _subset(x, y, limit, generator)
        x_train, y_train, x_val, y_val = _split(x, y, val_fraction, generator)
    else:
        x_val, y_val = _check_pair(*test, f"{name} (test set)")
        if x_val.shape[1] != x.shape[1]:
            raise DataError(f"{name}: test inputs have {x_val.shape[1]} features, training inputs {x.shape[1]}")
        x_train, y_train = x, y
        if limit is not None:
            x_train, y_train = _subset(x_train, y_train, limit, generator)
            x_val, y_val = _subset(x_val, y_val, limit, generator)
    top = float(x_train.max()) if path is not None and x_train.numel() else 1.0
    x_train, x_val = _scale(x_train, top), _scale(x_val, top)
    num_classes = int(max(int(y_train.max()), int(y_val.max()))) + 1
    return Dataset(name, x_train, y_train, x_val, y_val, num_classes)


def _subset(x: Tensor, y: Tensor, limit: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    keep = torch.randperm(x.shape[0], generator=generator)[:limit]
    return x[keep], y[keep]
