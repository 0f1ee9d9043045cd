

def test_cli_prints_the_load_table(tiny, capsys):
    from qforge.tools.twin.__main__ import main

    assert main(["--model", tiny, "--gpus", "2", "--trace-load"]) == 0
    out = capsys.readouterr().out
    assert "on 2 ranks, bf16-mixed (twin bounds, not a measurement)" in out and "50.0%" in out
