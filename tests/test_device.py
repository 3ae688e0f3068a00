"""Which device a process runs on (utils.choose_device, the one rule of every entry point), and `make gpu-check` on
a machine where torch sees no GPU: one line and a non-zero exit within seconds, not hours of benchmarks on the CPU."""
import subprocess
import time

import pytest
import torch

from conftest import ROOT, assert_user_error, run
from utils import UserError, choose_device


def cuda(index):
    return torch.device("cuda", index)


def test_torchrun_processes_take_the_gpu_of_their_local_rank():
    # (name, local_rank, world, cuda_count, mps)
    assert choose_device(None, 3, 4, 8, False) == cuda(3)
    assert choose_device("cuda", 3, 4, 8, False) == cuda(3)  # not GPU 0 for every process
    assert choose_device("cuda:3", 3, 4, 8, False) == cuda(3)
    with pytest.raises(UserError, match="each process takes the GPU of its LOCAL_RANK"):
        choose_device("cuda:1", 0, 2, 2, False)
    assert choose_device("cpu", 1, 2, 8, False) == torch.device("cpu")  # gloo on the CPU under torchrun


def test_a_single_process_takes_the_gpu_it_is_given_with_its_index():
    assert choose_device(None, 0, 1, 2, False) == cuda(0)
    assert choose_device("cuda", 0, 1, 2, False) == cuda(0)
    assert choose_device("cuda:1", 0, 1, 2, False) == cuda(1)
    with pytest.raises(UserError, match="GPU 2 asked for, 2 visible"):
        choose_device("cuda:2", 0, 1, 2, False)


def test_without_a_gpu():
    assert choose_device(None, 0, 1, 0, False) == torch.device("cpu")
    assert choose_device(None, 0, 1, 0, True) == torch.device("mps")
    with pytest.raises(UserError, match="sees no CUDA GPU; the NVIDIA driver is 535.1, for CUDA 12.2 at most"):
        choose_device("cuda", 0, 1, 0, False, driver="the NVIDIA driver is 535.1, for CUDA 12.2 at most")
    with pytest.raises(UserError, match="not a device"):
        choose_device("gpu", 0, 1, 0, False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU does")
def test_asking_for_cuda_without_one_is_a_one_line_error(tmp_path):
    assert_user_error(run("bench.py", "cuda"), "sees no CUDA GPU")
    assert_user_error(run("bench.py", "train", "--device", "cuda:1"), "sees no CUDA GPU")
    started = time.time()
    result = subprocess.run(["make", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sees no CUDA GPU" in errors[0], result.stderr
    assert "pytest" not in result.stdout  # it stopped before the tests and the benchmarks
    assert time.time() - started < 60  # measured: about 5 s, the imports
