"""Vector files: safetensors round trip, and llama.cpp control-vector GGUF read back with gguf."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from rahf.data.schema import DataError
from rahf.hidden_states import decoder_blocks
from rahf.steering import SteeringVectors, load_vectors, steering
from rahf.steering.control_vector import save_gguf, save_safetensors
from rahf.testing import tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 8, 11]])


@pytest.fixture()
def vectors():
    torch.manual_seed(1)
    return SteeringVectors({layer: torch.randn(32) for layer in (1, 2, 3, 4)}, model="tiny", source="test",
                           layers=[2, 4], strength=1.5, extra={"note": 1})


def test_safetensors_round_trip(tmp_path, vectors):
    back = load_vectors(save_safetensors(vectors, tmp_path / "v.safetensors"))
    assert sorted(back.vectors) == [1, 2, 3, 4]
    assert all(torch.equal(back.vectors[k], vectors.vectors[k]) for k in vectors.vectors)
    assert (back.layers, back.strength, back.model, back.extra) == ([2, 4], 1.5, "tiny", {"note": 1})
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(DataError, match="bad.safetensors"):
        load_vectors(tmp_path / "bad.safetensors")


def test_gguf_names_shapes_values_and_metadata(tmp_path, vectors):
    path = save_gguf(vectors, tmp_path / "cv.gguf", strength=2.0, model_hint="llama")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    # hidden_states[2] and [4] are the outputs of blocks 1 and 3: llama.cpp's direction.1 and .3
    assert sorted(tensors) == ["direction.1", "direction.3"]
    for name, layer in (("direction.1", 2), ("direction.3", 4)):
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [32]
        np.testing.assert_allclose(np.array(t.data), 2.0 * vectors.vectors[layer].numpy(), rtol=1e-6)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "controlvector"
    assert fields["controlvector.model_hint"].contents() == "llama"
    assert fields["controlvector.layer_count"].contents() == 2
    with pytest.raises(DataError, match="layer 1"):
        save_gguf(vectors, tmp_path / "bad.gguf", layers=[1, 2])
    assert not (tmp_path / "bad.gguf").exists()


def test_gguf_steers_like_in_process_and_like_llama_cpp(tmp_path, vectors):
    """The file, read back, gives the same logits as in-process steering; and applying it the way
    llama.cpp does (direction.k added to the output of 0-based block k) gives them too."""
    model = tiny_model(layers=4).eval()
    path = save_gguf(vectors, tmp_path / "cv.gguf", layers=[2, 3], strength=1.0)
    with torch.no_grad(), steering(model, vectors.vectors, strength=2.5, layers=[2, 3]):
        in_process = model(IDS).logits
    loaded = load_vectors(path)
    assert loaded.layers == [2, 3]
    with torch.no_grad(), steering(model, loaded.vectors, strength=2.5):
        from_file = model(IDS).logits
    torch.testing.assert_close(from_file, in_process)

    # llama.cpp semantics, independently of rahf's layer mapping.
    handles = []
    for t in gguf.GGUFReader(str(path)).tensors:
        k = int(t.name.split(".")[1])
        direction = torch.from_numpy(np.array(t.data)) * 2.5
        handles.append(decoder_blocks(model)[k].register_forward_hook(
            lambda _m, _i, out, d=direction: (out[0] + d, *out[1:]) if isinstance(out, tuple) else out + d))
    try:
        with torch.no_grad():
            llama_cpp = model(IDS).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(llama_cpp, in_process)
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, in_process, atol=1e-3)  # steering did something
