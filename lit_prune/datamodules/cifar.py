"""CIFAR-10 / CIFAR-100 as in the paper's CIFAR experiments (paper-spec 1.2).

Train transform: zero-pad 4, random 32x32 crop, random horizontal flip, ToTensor, Normalize. Test
transform: ToTensor, Normalize. Validation and test both use the test split, as the reference scripts
do (the paper reports final-epoch test accuracy; no model selection is done on it).

Normalisation (``normalization``):

* ``"l1"``: mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010) for both datasets, as in the
  L1-norm, Network Slimming, weight-level and lottery-ticket code.
* ``"sfp"``: the per-dataset statistics of the Soft Filter Pruning code.

On-disk layout: torchvision's, i.e. the extracted python-version archives
``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` and
``<root>/cifar-100-python/{train,test,meta}``. torchvision checks the md5 of every file; ``verify: false``
skips that check and exists for generated test data only.

Every batch and meta file is read with a restricted unpickler (:func:`read_batch`), whatever ``verify``
says: it admits only what a CIFAR batch holds (dicts, lists, strings, ints and numpy arrays) and refuses
any other global, so a file that is not a CIFAR batch cannot run code; a truncated or malformed file gives
an error that names it.

Example (YAML, LightningCLI)::

    data:
      class_path: datamodules.CIFARDataModule
      init_args:
        root: data/
        dataset: cifar100
        batch_size: 64
        download: true
        device: true    # the whole split on the training device, augmented there (much faster on a GPU)
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, CIFAR100

from lit_prune.datamodules.base import DeviceAugmentation, ImageClassificationDataModule

_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}

# (mean, std) per normalization scheme and dataset.
_L1_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
_STATS: dict[str, dict[str, tuple[tuple[float, ...], tuple[float, ...]]]] = {
    "l1": {"cifar10": _L1_STATS, "cifar100": _L1_STATS},
    "sfp": {
        "cifar10": (
            tuple(v / 255 for v in (125.3, 123.0, 113.9)),
            tuple(v / 255 for v in (63.0, 62.1, 66.7)),
        ),
        "cifar100": (
            tuple(v / 255 for v in (129.3, 124.1, 112.4)),
            tuple(v / 255 for v in (68.2, 65.4, 70.4)),
        ),
    },
}


# The globals a CIFAR batch pickle may name: numpy's array and scalar reconstruction (numpy 1 wrote
# ``numpy.core``, numpy 2 writes ``numpy._core``; protocol 5 pickles rebuild arrays with ``_frombuffer``) and
# plain containers. None of them runs code from the file.
_ALLOWED_GLOBALS = {
    *((f"{core}.multiarray", name) for core in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")),
    *((f"{core}.numeric", "_frombuffer") for core in ("numpy.core", "numpy._core")),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *(("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "bytearray")),
    ("_codecs", "encode"),  # how Python 3 writes bytes (an array's buffer) in protocol 0-2 pickles
}


class CIFARFileError(ValueError):
    """A CIFAR batch or meta file that is not a readable CIFAR pickle (corrupted, truncated or foreign)."""


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that admits only the globals of :data:`_ALLOWED_GLOBALS`."""

    def __init__(self, file: Any, path: str) -> None:
        # Real CIFAR pickles were written by Python 2: latin1 keeps their keys as str.
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise CIFARFileError(
                f"{self.path} is not a CIFAR batch file: it asks to load {module}.{name}, and a CIFAR batch "
                "holds only numpy arrays, lists, dicts and strings. Refusing to read it (it could run code); "
                "delete the file and get the data again."
            )
        return super().find_class(module, name)


def read_batch(path: str | os.PathLike, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read one CIFAR python batch (or meta) file safely; ``keys``: at least one of them must be present.

    Raises:
        CIFARFileError: a file that needs anything but arrays and containers (refused before anything of it
            runs), a truncated or corrupted file, or one without the expected entries; the message names it.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, path).load()
    except CIFARFileError:
        raise
    except Exception as err:  # EOFError (truncated), UnpicklingError, ValueError, ... : not a CIFAR pickle
        raise CIFARFileError(
            f"{path} is not a readable CIFAR batch file (truncated or corrupted: {type(err).__name__}: {err}). "
            "Delete the dataset folder and get the data again."
        ) from None
    if not isinstance(entry, dict) or (keys and not any(k in entry for k in keys)):
        what = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise CIFARFileError(f"{path} is not a CIFAR batch file: expected a dict with {' or '.join(keys)}, "
                             f"got {what}")
    return entry


class _SafeReadMixin:
    """torchvision's CIFAR loading, with every file read by :func:`read_batch` instead of plain pickle."""

    root: str
    base_folder: str
    train_list: list[list[str]]
    test_list: list[list[str]]
    meta: dict[str, str]

    def __init__(self, root: str, train: bool = True, transform: Any = None, target_transform: Any = None,
                 download: bool = False) -> None:
        # torchvision's VisionDataset (the class after CIFAR10 in the MRO); CIFAR10.__init__ would unpickle
        super(CIFAR10, self).__init__(root, transform=transform, target_transform=target_transform)
        self.train = train
        if download:
            self.download()
        if not self._check_integrity():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        data, self.targets = [], []
        for name, _ in self.train_list if train else self.test_list:
            path = os.path.join(self.root, self.base_folder, name)
            entry = read_batch(path, ("data",))
            labels = entry.get("labels", entry.get("fine_labels"))
            array = entry["data"]
            if (not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != 3072
                    or labels is None or len(labels) != len(array)):
                raise CIFARFileError(f"{path} is not a CIFAR batch file: expected 'data' of shape (N, 3072) and N "
                                     "'labels' (or 'fine_labels')")
            data.append(array)
            self.targets.extend(int(v) for v in labels)
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC
        self._load_meta()

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        if self._verify_meta() is False:
            raise RuntimeError("Dataset metadata file not found or corrupted. You can use download=True to download it")
        self.classes = read_batch(path, (self.meta["key"],))[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    def _verify_meta(self) -> bool:
        from torchvision.datasets.utils import check_integrity

        return check_integrity(os.path.join(self.root, self.base_folder, self.meta["filename"]), self.meta["md5"])


class _SkipIntegrityMixin(_SafeReadMixin):
    """Replaces torchvision's md5 checks by a presence check. For generated test data only."""

    root: str
    base_folder: str
    train_list: list[list[str]]
    test_list: list[list[str]]
    meta: dict[str, str]

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        return all(os.path.isfile(os.path.join(folder, name)) for name, _ in self.train_list + self.test_list)

    def _verify_meta(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.base_folder, self.meta["filename"]))


class _CIFAR10(_SafeReadMixin, CIFAR10):
    pass


class _CIFAR100(_SafeReadMixin, CIFAR100):
    pass


class _UnverifiedCIFAR10(_SkipIntegrityMixin, CIFAR10):
    pass


class _UnverifiedCIFAR100(_SkipIntegrityMixin, CIFAR100):
    pass


_DATASETS = {
    ("cifar10", True): _CIFAR10,
    ("cifar100", True): _CIFAR100,
    ("cifar10", False): _UnverifiedCIFAR10,
    ("cifar100", False): _UnverifiedCIFAR100,
}


class CIFARDataModule(ImageClassificationDataModule):
    """CIFAR-10 or CIFAR-100 through torchvision, with the paper's transforms.

    Args:
        root: directory that holds (or will receive) ``cifar-10-batches-py`` / ``cifar-100-python``.
        batch_size: images per batch (the paper: 64 for L1/slimming/weight-level, 128 for SFP).
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory (only used when CUDA is available).
        dataset: ``"cifar10"`` or ``"cifar100"``.
        download: download the archive in ``prepare_data`` if it is not in ``root`` (needs internet).
        normalization: ``"l1"`` (CIFAR-10 statistics for both datasets) or ``"sfp"`` (per dataset).
        augment: pad-4 random crop and horizontal flip on the training split.
        verify: check the md5 of every file, as torchvision does. Turn off only for generated data.
        device: the device-resident path (:mod:`lit_prune.datamodules.base`): each split held once as uint8 on
            the training device, the same pad-4 crop and flip drawn per image there, the same normalisation.

    Raises:
        ValueError: on an unknown ``dataset`` or ``normalization``.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        dataset: str = "cifar10",
        download: bool = False,
        normalization: str = "l1",
        augment: bool = True,
        verify: bool = True,
        device: bool = False,
    ) -> None:
        super().__init__(root, batch_size, num_workers, pin_memory, device)
        if dataset not in _NUM_CLASSES:
            raise ValueError(f"dataset must be one of {sorted(_NUM_CLASSES)}, got {dataset!r}")
        if normalization not in _STATS:
            raise ValueError(
                f"normalization must be 'l1' (L1/slimming/weight-level code) or 'sfp' (SFP code), "
                f"got {normalization!r}"
            )
        self.save_hyperparameters()
        self.dataset = dataset
        self.download = download
        self.normalization = normalization
        self.augment = augment
        self.verify = verify

    @property
    def num_classes(self) -> int:
        return _NUM_CLASSES[self.dataset]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean subtracted by Normalize."""
        return _STATS[self.normalization][self.dataset][0]

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel std divided by Normalize."""
        return _STATS[self.normalization][self.dataset][1]

    @property
    def folder(self) -> str:
        """The folder torchvision reads, e.g. ``<root>/cifar-10-batches-py``."""
        return os.path.join(self.root, self._dataset_class().base_folder)

    def train_transform(self) -> T.Compose:
        """Transform of the training split (augmentation only if ``augment``)."""
        if not self.augment:
            return self.test_transform()
        return T.Compose(
            [
                T.RandomCrop(32, padding=4),  # zero padding, as the reference code
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def test_transform(self) -> T.Compose:
        """Transform of the test split: ToTensor and Normalize only."""
        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def resident_tensors(self, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's uint8 images as (N, 3, 32, 32) (torchvision keeps them HWC) and its labels."""
        images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)

    def device_augmentation(self) -> DeviceAugmentation | None:
        """The device path's form of :meth:`train_transform`: zero-pad 4, random 32x32 crop, random flip."""
        return DeviceAugmentation(padding=4, flip=True) if self.augment else None

    def prepare_data(self) -> None:
        if not self.download:
            return
        try:
            # Downloads and extracts the single archive holding both splits (skipped if already valid).
            self._dataset_class()(self.root, train=True, download=True)
        except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad archive md5 a RuntimeError
            raise RuntimeError(
                f"could not download {self.dataset} into {self.folder}: {err}. {self._how_to_get()}"
            ) from err

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._load(train=True, transform=self.train_transform())
        if stage != "predict" and self.test_set is None:
            self.test_set = self._load(train=False, transform=self.test_transform())
            self.val_set = self.test_set

    def _dataset_class(self) -> Any:
        return _DATASETS[(self.dataset, self.verify)]

    def _how_to_get(self) -> str:
        cls = self._dataset_class()
        return (
            f"Set `download: true` on a machine with internet access, or download {cls.url} and extract "
            f"it into {self.root} (it creates {self.folder})."
        )

    def _load(self, train: bool, transform: T.Compose) -> Any:
        cls = self._dataset_class()
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [name for name in names if not os.path.isfile(os.path.join(self.folder, name))]
        if missing:
            raise FileNotFoundError(
                f"{self.dataset} not found: expected the files {names} in {self.folder} "
                f"(missing: {missing}). {self._how_to_get()}"
            )
        try:
            return cls(self.root, train=train, transform=transform, download=False)
        except RuntimeError as err:
            # Every file is present, so torchvision refused them on their md5.
            raise RuntimeError(
                f"the {self.dataset} files in {self.folder} fail torchvision's md5 check (corrupted, or not "
                f"the official python-version archive). Delete the folder and get the data again. "
                f"{self._how_to_get()} (`verify: false` skips the check; it is meant for generated data.)"
            ) from err
