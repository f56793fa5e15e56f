"""Bad input ends with exit code 2 and one line naming the key, before any data is loaded."""

import pytest

from fmnist_sweep.cli import main

BAD = [
    (["model=cnnn"], "unknown model option 'cnnn'. Choose one of: autoencoder, bilstm, cnn, "
                     "encoder_classifier, resnet, rnn. Did you mean model=cnn?"),
    (["optimizer=adma"], "Did you mean optimizer=adam?"),
    (["optimizer.lr=0"], "optimizer.lr=0 is not allowed: optimizer.lr must be a number > 0."),
    (["optimizer.lr=-0.1"], "optimizer.lr must be a number > 0"),
    (["model.dropouts=[0.2,0.3,1.0]"], "model.dropouts must be a number or a list of numbers in [0, 1)"),
    (["model=autoencoder", "model.dropout=1.0"], "model.dropout=1.0 is not allowed: model.dropout must be a number in [0, 1)"),
    (["model=autoencoder", "model.dropout=-0.1"], "model.dropout must be a number in [0, 1)"),
    (["model=autoencoder", "model.latent_dim=0"], "model.latent_dim must be an integer >= 1"),
    (["trainer.batch_size=0"], "trainer.batch_size must be an integer >= 1"),
    (["trainer.epochs=0"], "trainer.epochs must be an integer >= 1"),
    (["trainer.device=tpu"], "trainer.device='tpu' is not allowed: trainer.device must be auto, cpu, cuda or cuda:N"),
    (["trainer.precision=fp16"], "trainer.precision must be auto, fp32 or bf16"),
    (["model=autoencoder", "model.latnet_dim=3"], "unknown config key 'model.latnet_dim'. Did you mean 'model.latent_dim'?"),
    (["model.widths=[32,64]"], "model.widths has 2 entries but model.dropouts has 3"),
    (["--bogus"], "unknown option --bogus"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_nothing_runs(args, message, workdir, tmp_path, capsys):
    # No data anywhere and downloads off: reaching the data loader would fail differently.
    code = main(args + [f"data.root={tmp_path}/none", "data.download=false"])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (workdir / "mlruns.db").exists()


def test_verbose_shows_the_traceback(workdir):
    with pytest.raises(Exception, match="optimizer.lr"):
        main(["optimizer.lr=0", "--verbose"])


def test_missing_data_is_one_clear_error(workdir, tmp_path, monkeypatch, capsys):
    from fmnist_sweep import data

    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "nowhere")
    code = main([f"data.root={tmp_path}/none", "data.download=false", "trainer.epochs=1"])
    err = capsys.readouterr().err
    assert code == 2 and "Fashion-MNIST not found in" in err and "dataset-fashion-mnist" in err


def test_cfg_prints_the_composed_config(workdir, capsys):
    assert main(["--cfg", "model=bilstm", "optimizer=adam", "optimizer.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "_target_: fmnist_sweep.models.bilstm.BiLSTM" in out and "lr: 0.01" in out


def test_help(capsys):
    assert main(["--help"]) == 0
    assert "python -m fmnist_sweep model=bilstm" in capsys.readouterr().out


def test_the_command_exits_with_main_s_code(workdir, tmp_path):
    """`python -m fmnist_sweep` runs cli.entry(): main()'s exit code and its one line reach
    the shell unchanged (entry() only freezes the collector's objects before the exit)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fmnist_sweep", "trainer.epochs=0", f"data.root={tmp_path}/none",
                           "data.download=false"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "trainer.epochs must be an integer >= 1" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stdout == "" and not (workdir / "mlruns.db").exists()
