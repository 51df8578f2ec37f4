"""Each study command runs end to end at its tiny size and writes its files."""

from __future__ import annotations

import pytest

from sparse_param.study import STUDIES
from sparse_param.study.__main__ import main

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = {
    "itop": ("itop_accuracy_vs_rs.png", "itop_rs_vs_interval.png"),
    "scsdc": ("scsdc_accuracy.png",),
    "gradflow": ("gradflow_egf_curves.png", "gradflow_correlation.png"),
}
TABLES = {
    "itop": "| method | ΔT | drop fraction | test accuracy (%) | final R_s |",
    "scsdc": "| sparse density | active weights | dense width (weights) |",
    "gradflow": "| network | optimizer | activation | BatchNorm | test accuracy (%) | mean EGF |",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STUDIES))
def test_study_runs_at_tiny_size_and_writes_its_files(name, tmp_path, capsys):
    path = main([name, "--tiny", "--out", str(tmp_path), "--seeds", "0", "1"])
    assert path == tmp_path / "results.md"
    text = path.read_text()
    assert TABLES[name] in text
    assert "± " in text and "Wall time:" in text
    assert text.count("holds") + text.count("inconclusive") >= 1  # a verdict per claim
    for plot in PLOTS[name]:
        assert (tmp_path / plot).read_bytes()[:8] == PNG, plot
    assert TABLES[name] in capsys.readouterr().out


def test_sizes_and_flags():
    for module in STUDIES.values():
        assert set(module.SIZES) == {"default", "full", "tiny"}
    with pytest.raises(SystemExit):
        main(["itop", "--out", "x", "--full", "--tiny"])
    with pytest.raises(SystemExit):
        main(["nope", "--out", "x"])


def test_help_shows_every_size_and_what_it_trains(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--tiny" in text and "--full" in text
    for name, module in STUDIES.items():
        for key, flag in (("tiny", "--tiny"), ("default", "(default)"), ("full", "--full")):
            size = module.SIZES[key]
            runs = module.runs_per_seed(size)
            row = [name, flag, str(size.epochs), str(len(size.seeds)), str(runs)]
            assert any(line.split()[:5] == row for line in text.splitlines()), (name, key)


@pytest.mark.parametrize("where", ["out", "inside"])
def test_an_out_that_is_a_file_is_refused_before_any_training(tmp_path, capsys, monkeypatch, where):
    taken = tmp_path / "results"
    taken.write_text("keep me")
    out = taken if where == "out" else taken / "study"
    for module in STUDIES.values():  # a run would train for minutes: none may start
        monkeypatch.setattr(module, "run", lambda *a: pytest.fail("a study ran"))
    with pytest.raises(SystemExit) as exit_info:
        main(["itop", "--tiny", "--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert f"--out {out}: {taken} is a file, and --out is a folder for results.md" in error
    assert taken.read_text() == "keep me"
