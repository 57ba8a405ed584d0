import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from helpers import make_mnist, write_idx
from toolkit import UserError
from toolkit.data.mapstyle import TensorDataset
from toolkit.data.readers import load_mnist, read_idx


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    x = torch.randint(0, 256, (7, 5, 3), dtype=torch.uint8)
    path = tmp_path / ("x.gz" if compress else "x")
    write_idx(path, x, compress)
    assert torch.equal(read_idx(path), x)


def test_truncated_idx_is_a_clear_error(tmp_path):
    path = tmp_path / "x"
    write_idx(path, torch.zeros(4, 4, dtype=torch.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(UserError, match="truncated"):
        read_idx(path)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    path = tmp_path / "x.gz"
    write_idx(path, torch.zeros(64, 64, dtype=torch.uint8), compress=True)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"x.gz is not a complete gzip file \(.*\); download it again"):
        read_idx(path)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_load_mnist_finds_files(tmp_path, layout):
    root = tmp_path / "data"
    make_mnist(root / "FashionMNIST" / "raw" if layout == "torchvision" else root, n_train=20, n_test=10,
               compress=layout == "flat")
    splits = load_mnist("fashion_mnist", root, download=False)
    assert splits["train"][0].shape == (20, 28, 28) and splits["train"][1].dtype == torch.int64
    assert splits["test"][0].shape == (10, 28, 28)


def test_missing_data_says_where_and_how(tmp_path, monkeypatch):
    with pytest.raises(UserError) as e:
        load_mnist("fashion_mnist", tmp_path, download=False)
    message = str(e.value)
    assert "\n" not in message
    assert f"in {tmp_path} or {tmp_path}/FashionMNIST/raw" in message
    assert "train-images-idx3-ubyte[.gz]" in message and "apt-get install dataset-fashion-mnist" in message

    monkeypatch.setattr("toolkit.data.readers._download_mnist", lambda name, root: "<urlopen error no network>")
    with pytest.raises(UserError, match="the download failed \\(<urlopen error no network>\\)"):
        load_mnist("mnist", tmp_path)


def test_unknown_data_set_name(tmp_path):
    with pytest.raises(UserError, match="data.name='cifar' is not one of mnist, fashion_mnist, kmnist"):
        load_mnist("cifar", tmp_path)


def batches(loader):
    return [[t.clone() for t in batch] for batch in loader]


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_tensor_dataset_serves_the_same_batches_as_the_standard_path(num_processes):
    """Whole-batch indexing gives exactly what per-sample indexing plus default collate gives,
    also once each rank takes its shard."""
    x, y = torch.randn(203, 3), torch.arange(203)
    for rank in range(num_processes):
        loaders = []
        for dataset, collate in ((TensorDataset(x, y), TensorDataset.collate_fn),
                                 (torch.utils.data.TensorDataset(x, y), None)):
            loader = DataLoader(dataset, batch_size=16, shuffle=True, collate_fn=collate)
            loaders.append(prepare_data_loader(loader, num_processes=num_processes, process_index=rank,
                                               use_seedable_sampler=True, data_seed=5))
        fast, standard = batches(loaders[0]), batches(loaders[1])
        assert len(fast) == len(standard) > 0
        for (fx, fy), (sx, sy) in zip(fast, standard):
            assert torch.equal(fx, sx) and torch.equal(fy, sy)


def test_tensor_dataset_gives_one_sample_by_index_as_torch_does():
    x, y = torch.randn(5, 3), torch.arange(5)
    for i in range(5):
        sample, expected = TensorDataset(x, y)[i], torch.utils.data.TensorDataset(x, y)[i]
        assert torch.equal(sample[0], expected[0]) and torch.equal(sample[1], expected[1])


def test_tensor_dataset_transform_runs_per_batch():
    seen = []
    dataset = TensorDataset(torch.arange(10), transform=lambda batch: seen.append(len(batch[0])) or batch)
    loader = DataLoader(dataset, batch_size=4, collate_fn=TensorDataset.collate_fn)
    assert [b[0].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert seen == [4, 4, 2]
