"""The axis file format: round trip, and refusals that name the file and the problem."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from axiscap.steering import AssistantAxis, AxisFileError, load_axis, save_axis

from .conftest import SHIPPED_AXIS


def sample_axis(n_layers=6, hidden=8) -> AssistantAxis:
    return AssistantAxis(torch.randn(n_layers, hidden), [3, 4], [-1.5, 0.25], 4, "tiny", 25.0, 123,
                         extra={"monitor_mean": "1.0"})


def test_round_trip(tmp_path):
    axis = sample_axis()
    save_axis(axis, tmp_path / "a.safetensors")
    back = load_axis(tmp_path / "a.safetensors", n_layers=6, hidden_size=8)
    assert torch.equal(back.axis, axis.axis)
    assert (back.cap_layers, back.cap_thresholds, back.monitor_layer) == ([3, 4], [-1.5, 0.25], 4)
    assert (back.model, back.percentile, back.n_samples) == ("tiny", 25.0, 123)
    assert back.monitor_mean == 1.0 and back.threshold(4) == 0.25 and back.threshold(0) is None
    assert back.monitor_tau == 0.25 and back.gate_threshold is None and back.calibration is None


@pytest.mark.parametrize("kwargs, problem", [
    ({"n_layers": 7}, "axis has 6 layers but the model has 7"),
    ({"hidden_size": 9}, "axis hidden size is 8 but the model's is 9"),
])
def test_mismatch_with_model_is_refused(tmp_path, kwargs, problem):
    save_axis(sample_axis(), tmp_path / "a.safetensors")
    with pytest.raises(AxisFileError) as err:
        load_axis(tmp_path / "a.safetensors", **kwargs)
    assert problem in str(err.value) and "a.safetensors" in str(err.value)


def write_raw(path, axis, cap_layers, thresholds, **meta):
    metadata = {"format": "axiscap-axis/1", "model": "m", "monitor_layer": "1", "percentile": "25",
                "n_samples": "3", **meta}
    save_file({"axis": axis, "cap_layers": torch.tensor(cap_layers, dtype=torch.int64),
               "cap_thresholds": torch.tensor(thresholds, dtype=torch.float32)}, str(path),
              metadata={k: v for k, v in metadata.items() if v is not None})


@pytest.mark.parametrize("case, problem", [
    ("nan", "non-finite values in layers [2]"),
    ("missing_threshold", "2 capped layers but 1 thresholds"),
    ("layer_out_of_range", "layer 9 is outside 0..3"),
    ("zero_axis", "axis of layer 1 is all zeros"),
    ("missing_metadata", "missing metadata ['percentile']"),
    ("wrong_format", "format is 'something-else'"),
    ("bad_gate_threshold", "metadata 'gate_threshold' (gated capping: "),
    ("bad_calibration", "metadata 'calibration' (axes calibrate's record"),
    ("bad_separation", "metadata 'separation_d' (per layer, Cohen's d"),
    ("bad_detector", "metadata 'gate_detector' (gated capping's token detector"),
])
def test_bad_files_are_refused_with_a_message(tmp_path, case, problem):
    axis = torch.randn(4, 8)
    layers, taus, meta = [1, 2], [0.0, 0.1], {}
    if case == "nan":
        axis[2, 3] = float("nan")
    elif case == "missing_threshold":
        taus = [0.0]
    elif case == "layer_out_of_range":
        layers = [1, 9]
    elif case == "zero_axis":
        axis[1] = 0
    elif case == "missing_metadata":
        meta = {"percentile": None}
    elif case == "wrong_format":
        meta = {"format": "something-else"}
    elif case == "bad_gate_threshold":
        meta = {"gate_threshold": "high"}
    elif case == "bad_calibration":
        meta = {"calibration": "[1, 2]"}  # JSON, but not the object calibrate writes
    elif case == "bad_separation":
        meta = {"separation_d": "0.1,,0.3"}
    elif case == "bad_detector":
        meta = {"gate_detector": '{"threshold": 3.0, "ewma_lambda": 0, "warmup": 4}'}  # lambda 0 never moves
    path = tmp_path / f"{case}.safetensors"
    write_raw(path, axis, layers, taus, **meta)
    with pytest.raises(AxisFileError) as err:
        load_axis(path)
    assert problem in str(err.value), str(err.value)
    assert str(path) in str(err.value)


def test_garbage_and_missing_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(AxisFileError, match="not a readable safetensors file"):
        load_axis(junk)
    with pytest.raises(AxisFileError, match="no such file"):
        load_axis(tmp_path / "absent.safetensors")


def test_shipped_smollm2_axis_is_valid():
    axis = load_axis(SHIPPED_AXIS, n_layers=30, hidden_size=576)
    assert axis.model == "smollm2-135m-instruct"
    assert 0 < axis.percentile <= 25 and axis.n_samples > 1000  # axes calibrate chose it (its own test)
    assert len(axis.cap_layers) >= 2 and 10 <= min(axis.cap_layers) and max(axis.cap_layers) < 30
    assert axis.monitor_layer in axis.cap_layers


def test_server_refuses_to_start_with_a_mismatched_axis(tmp_path):
    bad = tmp_path / "wrong-shape.safetensors"
    save_axis(sample_axis(n_layers=12, hidden=576), bad)
    run = subprocess.run([sys.executable, "-m", "axiscap.cli", "serve", "--axis", str(bad), "--port", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert f"axis file {bad}: axis has 12 layers but the model has 30" in run.stderr
