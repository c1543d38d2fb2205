"""Importing the paper's published axes: layout, sign convention, CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from axiscap.axes.paper_import import PaperFormatError, import_paper_axis
from axiscap.steering import cap, load_axis

N_LAYERS, HIDDEN = 8, 16


@pytest.fixture
def paper_files(tmp_path):
    """Synthetic files in exactly the published layout (vectors point toward role-play)."""
    g = torch.Generator().manual_seed(0)
    assistant_axis = torch.randn(N_LAYERS, HIDDEN, generator=g)
    vectors, interventions = {}, []
    for layer, c in [(5, 2.5), (6, -1.0)]:
        role_dir = -assistant_axis[layer] * 3 + 0.1 * torch.randn(HIDDEN, generator=g)  # role - default
        name = f"layer_{layer}/contrast_role_pos3_default1"
        vectors[name] = {"vector": role_dir, "layer": layer}
        interventions.append({"vector": name, "cap": c})
    config = {"vectors": vectors, "experiments": [
        {"id": "layers_5:7-p0.25", "interventions": interventions},
        {"id": "layers_6:7-p0.5", "interventions": interventions[1:]},
    ]}
    torch.save(assistant_axis, tmp_path / "assistant_axis.pt")
    torch.save(config, tmp_path / "capping_config.pt")
    return tmp_path, assistant_axis, config


def paper_cap(h, role_vector, ceiling):
    """The paper's own rule: a ceiling on the projection onto the unit role-ward vector."""
    u = role_vector / role_vector.norm()
    excess = ((h @ u) - ceiling).clamp(min=0)
    return h - excess.unsqueeze(-1) * u


def test_import_reproduces_the_papers_capping(paper_files):
    folder, assistant_axis, config = paper_files
    axis = import_paper_axis(folder / "assistant_axis.pt", folder / "capping_config.pt", "layers_5:7-p0.25", "m")
    assert axis.cap_layers == [5, 6] and axis.cap_thresholds == [-2.5, 1.0]
    assert axis.percentile == 25.0 and axis.monitor_layer == 6
    h = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(1)) * 4
    for layer, name in [(5, "layer_5/contrast_role_pos3_default1"), (6, "layer_6/contrast_role_pos3_default1")]:
        entry = config["vectors"][name]
        ceiling = next(i["cap"] for i in config["experiments"][0]["interventions"] if i["vector"] == name)
        ours = cap(h, axis.unit(layer), axis.threshold(layer))
        theirs = paper_cap(h, entry["vector"], ceiling)
        torch.testing.assert_close(ours, theirs)
        assert not torch.allclose(ours, h), "the cap never bit"
        # Our axis points toward the Assistant, like assistant_axis.pt.
        assert torch.cosine_similarity(axis.axis[layer], assistant_axis[layer], dim=0) > 0.9
    # Uncapped layers keep assistant_axis.pt as it is.
    assert torch.equal(axis.axis[0], assistant_axis[0])


def test_unknown_experiment_lists_the_known_ones(paper_files):
    folder, _, _ = paper_files
    with pytest.raises(PaperFormatError, match=r"no experiment 'nope'.*layers_5:7-p0.25"):
        import_paper_axis(folder / "assistant_axis.pt", folder / "capping_config.pt", "nope", "m")


def test_cli_converts_to_a_loadable_axis_file(paper_files):
    folder, _, _ = paper_files
    out = folder / "converted.safetensors"
    run = subprocess.run([sys.executable, "-m", "axiscap.cli", "axes", "import-paper",
                          "--axis-pt", str(folder / "assistant_axis.pt"), "--config", str(folder / "capping_config.pt"),
                          "--experiment", "layers_6:7-p0.5", "--model", "paper-model", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    axis = load_axis(out, n_layers=N_LAYERS, hidden_size=HIDDEN)
    assert axis.cap_layers == [6] and axis.cap_thresholds == [1.0]
    assert axis.model == "paper-model" and axis.percentile == 50.0


def test_import_accepts_what_the_papers_loaders_accept(tmp_path, paper_files, caplog):
    """numpy numbers in the config, a wrapped axis, an index for the experiment, a non-capping
    intervention (skipped with a warning), and the paper's target layer as the monitor layer."""
    import numpy as np

    folder, assistant_axis, config = paper_files
    steer = {"vector": "layer_5/contrast_role_pos3_default1", "coefficient": 1.0}  # no 'cap'
    config["experiments"][0]["interventions"] = [
        steer, *({**i, "cap": np.float32(i["cap"])} for i in config["experiments"][0]["interventions"])]
    config["vectors"]["layer_6/contrast_role_pos3_default1"]["layer"] = np.int64(6)
    torch.save(config, tmp_path / "numpy_config.pt")
    torch.save({"axis": assistant_axis}, tmp_path / "wrapped_axis.pt")
    with caplog.at_level("WARNING"):
        axis = import_paper_axis(tmp_path / "wrapped_axis.pt", tmp_path / "numpy_config.pt", "0", "m")
    assert axis.cap_layers == [5, 6] and axis.cap_thresholds == [-2.5, 1.0]
    assert "has no 'cap'" in caplog.text
    assert import_paper_axis(tmp_path / "wrapped_axis.pt", tmp_path / "numpy_config.pt", 1, "m").cap_layers == [6]
    with pytest.raises(PaperFormatError, match="no experiment at index 2; it has 2"):
        import_paper_axis(tmp_path / "wrapped_axis.pt", tmp_path / "numpy_config.pt", "2", "m")
    # The paper's target layer for its models (its README's table) is monitored, unless told otherwise;
    # a config that names one wins.
    wide = torch.randn(48, HIDDEN)
    torch.save(wide, tmp_path / "wide_axis.pt")
    assert import_paper_axis(tmp_path / "wide_axis.pt", tmp_path / "numpy_config.pt", 0,
                             "google/gemma-2-27b-it").monitor_layer == 22
    assert import_paper_axis(tmp_path / "wide_axis.pt", tmp_path / "numpy_config.pt", 0, "google/gemma-2-27b-it",
                             monitor_layer=5).monitor_layer == 5
    torch.save({**config, "target_layer": 7}, tmp_path / "targeted.pt")
    assert import_paper_axis(tmp_path / "wrapped_axis.pt", tmp_path / "targeted.pt", 0, "m").monitor_layer == 7


def test_a_pickle_that_runs_code_is_refused(tmp_path, paper_files):
    folder, _, _ = paper_files

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"vectors": {}, "experiments": [], "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(PaperFormatError, match="cannot be read"):
        import_paper_axis(folder / "assistant_axis.pt", tmp_path / "evil.pt", 0, "m")
