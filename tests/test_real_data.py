"""LeNet on the real Fashion-MNIST files of the Debian package `dataset-fashion-mnist`."""

import pytest

from helpers import FASHION_MNIST, LENET, launch, only_run, summary


@pytest.mark.skipif(not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"no Fashion-MNIST in {FASHION_MNIST}: apt-get install dataset-fashion-mnist")
def test_lenet_reaches_86_percent_on_fashion_mnist_in_two_epochs(tmp_path):
    result = launch([LENET, "data.name=fashion_mnist", f"data.root={FASHION_MNIST}", "epochs=2",
                     f"output_dir={tmp_path}"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    test = summary(only_run(tmp_path))["test"]
    assert test["samples"] == 10000
    assert test["accuracy"] >= 0.86
