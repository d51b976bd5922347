"""The `selfboottok` command: help on every subcommand, the demo end to end (then
reconstruct, generate and eval on its model), and one line + exit status 2 for each expected
failure."""

import json
import subprocess
import sys

import pytest
import torch

from selfboottok.cli import build_parser

SUBCOMMANDS = ["demo", "train", "tokenize", "merge", "reconstruct", "generate", "eval", "ops", "bench"]


def run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "selfboottok.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("sub", [None] + SUBCOMMANDS)
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(([sub] if sub else []) + ["--help"])
    assert exc.value.code == 0
    assert "usage: selfboottok" in capsys.readouterr().out


def test_train_stage2_needs_init(tmp_path):
    res = run("train", "stage2", "--preset", "tiny", "--out", str(tmp_path))
    assert res.returncode != 0 and "--init" in res.stderr


def test_demo_writes_every_output_then_reconstruct_and_generate(tmp_path):
    out = tmp_path / "demo"
    res = run("demo", "--minutes", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("report.md", "metrics.json", "reconstructions.png", "generations_maskgit.png",
                 "generations_ar.png", "stage1/loss_curves.png", "stage2/generator/loss_curves.png",
                 "stage2/bootstrap/loss_curves.png", "stage1/metrics.jsonl",
                 "stage2/generator/metrics.jsonl", "stage2/bootstrap/metrics.jsonl",
                 "stage2/model/model.safetensors"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert all(m["paths"][p]["psnr"] > 0 for p in ("full", "global"))
    for kind in ("maskgit", "ar"):
        per_class = m["generated"][kind]["class_acc_per_class"]
        assert len(per_class) == 10 and 0 <= m["generated"][kind]["class_acc"] <= 1
    assert set(m["class_nats_per_token"]) == {"maskgit", "ar"} and set(m["steps"]) == {"stage1", "generator", "bootstrap"}
    model = out / "stage2" / "model"
    res = run("generate", "--model", str(model), "--classes", "1", "3", "--n", "2", "--steps", "2",
              "--out", str(tmp_path / "gen"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "gen").glob("class*_*.png"))) == 4
    res = run("reconstruct", "--model", str(model), str(tmp_path / "gen" / "class1_000.png"),
              "--out", str(tmp_path / "rec"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "rec" / "reconstructions.png").is_file()
    res = run("reconstruct", "--model", str(model), str(tmp_path / "missing.png"), "--out", str(tmp_path))
    assert res.returncode != 0 and "missing.png" in res.stderr
    res = run("eval", "--model", str(model), "--what", "psnr", "rfid", "codebook", "--n", "6",
              "--samples", "12", "--batch-size", "3", "--out", str(tmp_path / "eval"))
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["n"] == 6 and m["extractor"] and m["data"] == "synthetic"
    for key in ("psnr", "psnr_boot", "ssim", "rfid", "rfid_boot", "codebook_usage"):
        assert m[key] is not None and m[key] == m[key], key
    assert "gfid" not in m


# Expected failures: one line `selfboottok: error: ...` on stderr, exit status 2, no traceback.

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from selfboottok import SelfBootTok

    folder = tmp_path_factory.mktemp("model")
    SelfBootTok().save_pretrained(folder)
    return folder


def fails(capsys, *argv, expect):
    from selfboottok.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("selfboottok: error: "), err
    assert "Traceback" not in err and expect in err, err
    return err


@pytest.mark.parametrize("setting,expect", [
    ("encoder.size=3", "encoder has no setting 'size'"), ("colour=red", "no setting 'colour'"),
    ("encoder=3", "is a group of settings"), ("seed", "expects KEY=VALUE"),
    ("train.lr=abc", "train.lr=abc: expected a number"), ("seed=1.5", "expected an integer"),
    ("ema_teacher=true", "expected a number"), ("generators=ar", "expected a list"),
    ("image_size=30", "must be a positive multiple of patch_size"),
])
def test_bad_set_key_or_value(capsys, tmp_path, setting, expect):
    fails(capsys, "train", "stage1", "--set", setting, "--out", tmp_path, expect=expect)


def test_set_reads_numbers_yaml_leaves_as_strings():
    from selfboottok.cli import _config, build_parser

    args = build_parser().parse_args(["train", "stage1", "--set", "train.lr=3e-4", "--set",
                                      "generators=[ar]", "--out", "x"])
    config = _config(args)
    assert config.train.lr == 3e-4 and config.generators == ("ar",)


@pytest.mark.parametrize("text,expect", [(None, "does not exist"), ("a: [1, 2\n", "--config"),
                                         ("- 1\n- 2\n", "must hold a mapping"),
                                         ("encoder:\n  size: 3\n", "unknown field")])
def test_bad_config_file(capsys, tmp_path, text, expect):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    fails(capsys, "train", "stage1", "--config", path, "--out", tmp_path, expect=expect)


def test_resume_without_a_checkpoint_or_from_a_truncated_one(capsys, tmp_path):
    args = ["train", "stage1", "--samples", "8", "--resume", "--out", tmp_path]
    fails(capsys, *args, expect="does not exist")
    ckpt = tmp_path / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    fails(capsys, *args, expect="truncated or corrupt")


def test_truncated_checkpoint_in_a_subprocess_and_debug_traceback(tmp_path):
    ckpt = tmp_path / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"\0" * 100)
    args = ["train", "stage1", "--samples", "8", "--resume", "--out", str(tmp_path)]
    res = run(*args, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.splitlines() == [res.stderr.strip()] and "--resume: checkpoint" in res.stderr
    res = run("--debug", *args, timeout=300)
    assert res.returncode == 1 and "Traceback" in res.stderr and "CheckpointError" in res.stderr


@pytest.mark.parametrize("argv", [
    ["reconstruct", "--model", "{missing}", "{image}", "--out", "{tmp}"],
    ["generate", "--model", "{missing}", "--out", "{tmp}"],
    ["eval", "--model", "{missing}", "--out", "{tmp}"],
    ["tokenize", "--model", "{missing}", "--out", "{tmp}"],
    ["train", "stage2", "--init", "{missing}", "--out", "{tmp}"],
    ["merge", "--generator", "{missing}", "--bootstrap", "{missing}", "--out", "{tmp}"],
])
def test_missing_model_folder(capsys, tmp_path, argv):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    names = {"missing": tmp_path / "no_model", "image": tmp_path / "a.png", "tmp": tmp_path / "out"}
    fails(capsys, *[a.format(**names) for a in argv], expect="no_model")


def test_missing_or_unreadable_image(capsys, tmp_path, model_dir):
    fails(capsys, "reconstruct", "--model", model_dir, tmp_path / "none.png", "--out", tmp_path,
          expect="image " + str(tmp_path / "none.png") + ": no such file")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    fails(capsys, "reconstruct", "--model", model_dir, tmp_path / "bad.png", "--out", tmp_path,
          expect="cannot be read as an image")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("cmd", ["generate", "eval", "tokenize", "reconstruct"])
def test_cuda_request_without_a_gpu(capsys, tmp_path, model_dir, cmd):
    extra = [tmp_path / "a.png"] if cmd == "reconstruct" else []
    if extra:
        from PIL import Image

        Image.new("RGB", (32, 32)).save(extra[0])
    fails(capsys, cmd, "--model", model_dir, *extra, "--device", "cuda", "--out", tmp_path,
          expect="--device cuda: torch sees no CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_train_cuda_request_without_a_gpu(capsys, tmp_path, model_dir, stage):
    init = ["--init", model_dir] if stage == "stage2" else ["--preset", "tiny"]
    fails(capsys, "train", stage, *init, "--device", "cuda", "--out", tmp_path,
          expect="--device cuda: torch sees no CUDA GPU")
    assert not (tmp_path / "checkpoints").exists()


def test_bad_device_name(capsys, tmp_path, model_dir):
    fails(capsys, "generate", "--model", model_dir, "--device", "tpu", "--out", tmp_path,
          expect="expected auto, cpu, cuda or cuda:N")


@pytest.mark.parametrize("argv", [
    ["train", "stage1", "--data", "{bad}", "--out", "{tmp}"],
    ["eval", "--model", "{model}", "--data", "{bad}", "--out", "{tmp}"],
    ["tokenize", "--model", "{model}", "--data", "{bad}", "--out", "{tmp}"],
    ["train", "stage2", "--init", "{model}", "--data", "{bad}", "--out", "{tmp}"],
])
def test_bad_data_path(capsys, tmp_path, model_dir, argv):
    names = {"bad": tmp_path / "no_data", "model": model_dir, "tmp": tmp_path / "out"}
    fails(capsys, *[a.format(**names) for a in argv], expect="--data " + str(tmp_path / "no_data"))


def test_bad_eval_what_and_other_usage_errors(capsys, tmp_path, model_dir):
    fails(capsys, "eval", "--model", model_dir, "--what", "fid", expect="argument --what: invalid choice: 'fid'")
    fails(capsys, "train", "stage1", "--out", tmp_path, "--bogus", expect="unrecognized arguments: --bogus")
    fails(capsys, "train", "stage2", "--out", tmp_path, expect="needs --init")
    fails(capsys, "train", "stage2", "--init", model_dir, "--ids", tmp_path, "--out", tmp_path,
          expect="--ids: " + str(tmp_path) + " holds no manifest.json")
    fails(capsys, "train", "stage2", "--init", model_dir, "--ids", tmp_path, "--parts", "bootstrap",
          "--out", tmp_path, expect="--ids trains the generators only")


# eval's generation metrics, judged by a domain evaluator (a tiny one: the default recipe trains
# for minutes)

@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    """A tiny model after a few steps of stage 1 and stage 2 on 32 synthetic images."""
    from selfboottok import SelfBootTokConfig
    from selfboottok.data import build_dataset
    from selfboottok.training import train_stage1, train_stage2

    root = tmp_path_factory.mktemp("trained")
    config = SelfBootTokConfig.preset("tiny").with_overrides(**{
        "train.batch_size": 8, "train.warmup_steps": 1, "train.log_every": 10**6,
        "train.sample_every": 10**6, "train.ckpt_every": 10**6})
    data = build_dataset("synthetic", 32, n=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_stage1(config, root / "stage1", dataset=data, total_steps=3)
        train_stage2(config, root / "stage1" / "model", root / "stage2", dataset=data, total_steps=3)
    finally:
        torch.set_num_threads(threads)
    return root / "stage2" / "model"


@pytest.fixture
def tiny_domain_evaluator(monkeypatch, tmp_path):
    import selfboottok.eval.domain as domain

    built = domain.domain_evaluator

    def tiny(dataset, image_size, **kw):
        return built(dataset, image_size, recipe={"n_train": 256, "n_test": 64, "epochs": 1, "width": 8},
                     cache_dir=tmp_path / "domain", progress=False)

    monkeypatch.setattr(domain, "domain_evaluator", tiny)


def one_class_folder(root):
    from PIL import Image

    for i in range(4):
        (root / "only").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(root / "only" / f"{i}.png")
    return root


def test_eval_class_accuracy_domain_fd_recall_and_guidance_sweep(capsys, tmp_path, trained_model,
                                                                   tiny_domain_evaluator):
    from selfboottok.cli import main

    out = tmp_path / "eval"
    main(["eval", "--model", str(trained_model), "--what", "class_acc", "domain_fd", "prec_recall",
          "--n", "20", "--batch-size", "10", "--steps", "2", "--generator", "ar", "--temperature", "0.9",
          "--k", "2", "--sweep-guidance", "0", "3", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_ref"] == 20 and m["n_generated"] == 20 and m["generator"] == "ar" and m["temperature"] == 0.9
    assert 0 <= m["class_acc"] <= 1 and len(m["class_acc_per_class"]) == 10 and m["domain_fd"] >= 0
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["prec_recall_k"] == 2
    assert m["evaluator"]["recipe"]["width"] == 8 and "gfid" not in m and "psnr" not in m
    assert [row["guidance"] for row in m["guidance_sweep"]] == [0.0, 3.0]
    assert (out / m["guidance_sweep_plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("class_acc: ", "domain_fd: ", "recall: ", "guidance 3: class_acc", "guidance_sweep.png written"):
        assert text in printed, text


def test_eval_all_leaves_out_the_domain_metrics_for_data_without_the_models_classes(tmp_path, model_dir):
    from selfboottok.cli import _dataset, _domain_evaluator, _model

    folder = one_class_folder(tmp_path / "folder")
    args = build_parser().parse_args(["eval", "--model", str(model_dir), "--data", str(folder)])
    model = _model(args.model)
    assert _domain_evaluator(args, model, _dataset(args, model.config, split="test"), "cpu") is None


@pytest.mark.parametrize("flags", [["--what", "psnr", "class_acc"], ["--what", "psnr", "--sweep-guidance", "1", "2"]])
def test_eval_domain_metrics_need_labelled_data(capsys, tmp_path, model_dir, flags):
    folder = one_class_folder(tmp_path / "folder")
    err = fails(capsys, "eval", "--model", model_dir, "--data", folder, *flags, "--out", tmp_path / "out",
                expect="the domain evaluator learns the classes of --data")
    assert "has 1 class(es); the model generates 10" in err and flags[2] in err
