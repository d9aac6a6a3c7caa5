"""The TorchScript runtime against torch itself, on small modules these tests script.

torch is in the dev extra (a CPU build); the GPU checks run where CUDA is present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from modelmesh.errors import InvalidArgument, ModelLoadFailed
from modelmesh.runtimes import get_runtime
from modelmesh.runtimes.torchscript import TorchScriptRuntime
from modelmesh.tensor import Tensor

# torch 2.13 deprecates torch.jit in favour of torch.export; TorchScript files still load.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


class Tiny(torch.nn.Module):
    """Linear layer + softmax: [N, 4] -> [N, 3] probabilities."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(features) * self.scale, dim=1)


class TwoInTwoOut(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a * b


class Named(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"doubled": x * 2, "argmax": torch.argmax(x, dim=1)}


def save(module: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module), str(path))
    return path


@pytest.fixture
def cpu_runtime() -> TorchScriptRuntime:
    return TorchScriptRuntime(device="cpu")


def test_registered_and_predictions_match_torch(tmp_path, cpu_runtime):
    assert isinstance(get_runtime("torchscript"), TorchScriptRuntime)
    file = save(Tiny(), tmp_path / "tiny" / "model.pt")
    model = cpu_runtime.load(file.parent, "tiny")  # a directory holding the file works
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    out = model.predict([Tensor("features", "FP32", x)], {})
    assert [t.name for t in out] == ["output-0"] and out[0].datatype == "FP32"
    want = torch.jit.load(str(file))(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(out[0].data, want, rtol=1e-6)
    assert [s.name for s in model.signature.inputs] == ["features"]
    assert model.gpu_bytes == 0
    weights = 4 * 3 * 4 + 3 * 4 + 4  # linear weight + bias + the scale buffer, float32
    assert model.size_bytes >= weights
    assert cpu_runtime.predict_size(file) == int(file.stat().st_size * 1.2)
    model.unload()


def test_inputs_by_name_else_by_position_and_tuple_outputs(tmp_path, cpu_runtime):
    model = cpu_runtime.load(save(TwoInTwoOut(), tmp_path / "m.pt"), "two")
    a = np.array([1.0, 2.0], dtype=np.float32)
    b = np.array([3.0, 4.0], dtype=np.float32)
    by_name = model.predict([Tensor("b", "FP32", b), Tensor("a", "FP32", a)], {})
    assert [t.name for t in by_name] == ["output-0", "output-1"]
    np.testing.assert_array_equal(by_name[0].data, a + b)
    np.testing.assert_array_equal(by_name[1].data, a * b)
    by_position = model.predict([Tensor("x", "FP32", a), Tensor("y", "FP32", b)], {})
    np.testing.assert_array_equal(by_position[1].data, a * b)
    with pytest.raises(InvalidArgument, match="takes 2 inputs"):
        model.predict([Tensor("a", "FP32", a)], {})


def test_dict_outputs_and_integer_results(tmp_path, cpu_runtime):
    model = cpu_runtime.load(save(Named(), tmp_path / "m.pt"), "named")
    x = np.array([[0.0, 5.0], [7.0, 1.0]], dtype=np.float64)
    out = {t.name: t for t in model.predict([Tensor("x", "FP64", x)], {})}
    np.testing.assert_array_equal(out["doubled"].data, x * 2)
    assert out["argmax"].datatype == "INT64"
    np.testing.assert_array_equal(out["argmax"].data, [1, 0])


def test_bad_inputs_and_files_say_what_is_wrong(tmp_path, cpu_runtime):
    model = cpu_runtime.load(save(Tiny(), tmp_path / "m.pt"), "tiny")
    with pytest.raises(InvalidArgument, match="rejected the input"):
        model.predict([Tensor("features", "FP32", np.zeros((2, 5), dtype=np.float32))], {})
    with pytest.raises(InvalidArgument, match="numeric tensors"):
        model.predict([Tensor("features", "BYTES", np.array([b"x"], dtype=object))], {})
    (tmp_path / "not.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelLoadFailed, match="not a TorchScript archive.*Python pickle"):
        cpu_runtime.load(tmp_path / "not.pt", "bad")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_cuda_asked_for_without_cuda_is_a_clear_failure(tmp_path):
    with pytest.raises(ModelLoadFailed, match="device 'cuda' was asked for but CUDA"):
        TorchScriptRuntime(device="cuda").load(save(Tiny(), tmp_path / "m.pt"), "tiny")


def test_environment_chooses_the_device(tmp_path, monkeypatch):
    monkeypatch.setenv("MM_TORCH_DEVICE", "cpu")
    model = TorchScriptRuntime().load(save(Tiny(), tmp_path / "m.pt"), "tiny")
    assert model.device.type == "cpu"  # type: ignore[attr-defined]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_placement_counts_gpu_memory_apart(tmp_path):
    big = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 4))
    model = TorchScriptRuntime().load(save(big, tmp_path / "m.pt"), "big")
    weights = sum(p.numel() * 4 for p in big.parameters())
    assert model.device.type == "cuda"  # type: ignore[attr-defined]
    assert model.gpu_bytes >= weights
    assert model.size_bytes < weights  # host memory holds the code, not the weights
    x = np.ones((2, 512), dtype=np.float32)
    out = model.predict([Tensor("input", "FP32", x)], {})
    want = big(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(out[0].data, want, rtol=1e-4, atol=1e-5)
    model.unload()
