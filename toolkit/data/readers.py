"""The recipes' file readers: MNIST-format IDX files and CIFAR-10 binary batches, read into
tensors without unpickling anything, and downloaded with torchvision where they are missing."""

import gzip
import struct
import zlib
from pathlib import Path

import torch

from toolkit import UserError

# ---------------------------------------------------------------------------------------------
# MNIST-format data: IDX files, gzipped or not.

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_SETS = {  # config name -> torchvision class, which also names the download folder
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "kmnist": "KMNIST",
}


def read_idx(path):
    """An IDX file (the MNIST format; `.gz` is decompressed) as a uint8 tensor of its shape."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        # In one call, which releases the GIL once: reading a GzipFile takes it back for every
        # chunk, and each time waits for whatever other thread runs.
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path} is not a complete gzip file ({e}); download it again") from None
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes (the MNIST format)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != torch.Size(shape).numel():
        raise UserError(f"{path} is truncated: header says {shape}, found {len(body)} bytes of data")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def load_mnist(name, root, download=True):
    """{"train": (images, labels), "test": (images, labels)} for an MNIST-format data set.

    Images are uint8 [N, 28, 28], labels int64 [N]. Files are looked for in `root` and in
    `root/<MNIST|FashionMNIST|KMNIST>/raw` (torchvision's layout); if absent and `download`,
    torchvision downloads them there.
    """
    if name not in MNIST_SETS:
        raise UserError(f"data.name={name!r} is not one of {', '.join(MNIST_SETS)}")
    root = Path(root)
    folders = [root, root / MNIST_SETS[name] / "raw"]
    files, error = _find_mnist_files(folders), None
    if files is None and download:
        error = _download_mnist(name, root)
        files = _find_mnist_files(folders)
    if files is None:
        wanted = ", ".join(f"{f}[.gz]" for pair in MNIST_FILES.values() for f in pair)
        hint = ("on Debian/Ubuntu, `apt-get install dataset-fashion-mnist` and "
                "data.root=/usr/share/datasets/fashion-mnist" if name == "fashion_mnist"
                else f"copy them there from a machine with internet (torchvision.datasets.{MNIST_SETS[name]})")
        reason = f"; the download failed ({error})" if download else ""
        raise UserError(f"{name} data not found: expected {wanted} in {' or '.join(map(str, folders))}"
                        f"{reason}; {hint}")
    return {split: (read_idx(images), read_idx(labels).long()) for split, (images, labels) in files.items()}


def _find_mnist_files(folders):
    for folder in folders:
        found = {}
        for split, names in MNIST_FILES.items():
            paths = [next((p for p in (folder / n, folder / f"{n}.gz") if p.is_file()), None) for n in names]
            if None in paths:
                break
            found[split] = paths
        else:
            return found
    return None


def _download_mnist(name, root):
    """Download with torchvision (imported here: it costs a second of start-up). Returns the error."""
    import torchvision

    dataset = getattr(torchvision.datasets, MNIST_SETS[name])
    try:
        for train in (True, False):
            dataset(str(root), train=train, download=True)
    except Exception as e:  # noqa: BLE001 - any failure becomes the reason in one clear message
        return _last_line(e)
    return None


def _last_line(error):
    """The last non-empty line of an exception's message (a download error's reason)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# ---------------------------------------------------------------------------------------------
# CIFAR-10, binary version: fixed-size records, read without unpickling anything (the python
# version that torchvision uses is a pickle).

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}


def read_cifar_bin(path):
    """One CIFAR-10 binary batch: (uint8 images [N, 3, 32, 32], int64 labels [N])."""
    data = Path(path).read_bytes()
    if len(data) % 3073:
        raise UserError(f"{path} is not a CIFAR-10 binary batch (its size is not a multiple of 3073 bytes)")
    records = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(-1, 3073)
    return records[:, 1:].reshape(-1, 3, 32, 32).clone(), records[:, 0].long()


def load_cifar10(root, download=True):
    """{"train": (images, labels), "test": (images, labels)} from <root>/cifar-10-batches-bin,
    downloaded there (the binary version, 162 MB) if absent and `download`."""
    folder = Path(root) / "cifar-10-batches-bin"
    missing = [f for files in CIFAR10_FILES.values() for f in files if not (folder / f).is_file()]
    error = None
    if missing and download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(CIFAR10_URL, str(root), md5=CIFAR10_MD5)
        except Exception as e:  # noqa: BLE001 - the reason goes into one clear message
            error = _last_line(e)
        missing = [f for files in CIFAR10_FILES.values() for f in files if not (folder / f).is_file()]
    if missing:
        reason = f"; the download failed ({error})" if error else ""
        raise UserError(f"CIFAR-10 not found: expected {', '.join(missing)} in {folder}{reason}; get "
                        f"{CIFAR10_URL} and unpack it in {root}")
    result = {}
    for split, files in CIFAR10_FILES.items():
        parts = [read_cifar_bin(folder / f) for f in files]
        result[split] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return result
