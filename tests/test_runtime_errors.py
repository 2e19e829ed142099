"""Loading a library on a machine that cannot run it fails with an error saying what to do."""

import pytest
from helpers import build_lib, make_tiny_llama, write_mlc_dir

from mlc.errors import ModelLoadError
from mlc.runtime.device import cuda_available
from mlc.runtime.model import LoadedModel

pytestmark = pytest.mark.skipif(cuda_available(), reason="needs a machine without a GPU")


@pytest.fixture(scope="module")
def cuda_lib(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda-lib")
    hf, hf_dir = make_tiny_llama(tmp)
    model_dir = write_mlc_dir(hf, tmp / "q4f16_1", "q4f16_1", hf_dir=hf_dir)
    return model_dir, build_lib(model_dir, "cuda:sm_90a")


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cuda_library_without_a_gpu_is_refused_clearly(cuda_lib, device):
    model_dir, lib = cuda_lib
    with pytest.raises(ModelLoadError) as err:
        LoadedModel(model_dir, lib, device)
    assert "cuda library" in err.value.message and "--device cpu" in err.value.message
    assert err.value.param == "model_lib"


def test_asking_for_cuda_without_a_gpu_is_refused_clearly(cuda_lib):
    model_dir, lib = cuda_lib
    with pytest.raises(ModelLoadError, match="no CUDA GPU") as err:
        LoadedModel(model_dir, lib, "cuda")
    assert err.value.param == "device"


def test_missing_library_names_the_compile_command(cuda_lib, tmp_path):
    model_dir, _ = cuda_lib
    with pytest.raises(ModelLoadError, match="mlc compile"):
        LoadedModel(model_dir, tmp_path / "absent.so", "cpu")
