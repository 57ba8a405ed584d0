"""Data: what the loop does with the datasets a recipe returns, and the names recipes import.

    mapstyle.py  map-style datasets: `TensorDataset` (a whole batch per indexing) and `SeededSamples`
                 (each sample's randomness a function of seed, epoch and index)
    streams.py   streams (`IterableDataset`): each sample once per pass with any processes and
                 workers, whether the library splits itself or not; resumable. `stream_part()`
    libraries.py the stream libraries it knows (HF `datasets`, webdataset, litdata, MosaicML): how their
                 streams split and resume, or read by index
    loaders.py   the loaders' protocol and `make_loader`, which picks a map-style or a stream loader
    readers.py   MNIST (IDX) and CIFAR-10 binary files
    packing.py   token batches packed into rows (`pack`), each sample attending to itself, or padded
    draws.py     randomness in evaluation, per sample (`draws.randn_like`), so that metrics are exact

`from toolkit.data import TensorDataset, stream_part, load_mnist, pack` is what recipes write.
"""

from toolkit.data import draws
from toolkit.data.mapstyle import SeededSamples, TensorDataset
from toolkit.data.packing import pack, padded
from toolkit.data.readers import load_cifar10, load_mnist, read_idx
from toolkit.data.streams import stream_part

__all__ = ["SeededSamples", "TensorDataset", "draws", "load_cifar10", "load_mnist", "pack", "padded", "read_idx",
           "stream_part"]
