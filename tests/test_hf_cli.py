"""Hugging Face interop (same logits as transformers' OpenAIGPTLMHeadModel) and the `gpt1` CLI's
generate / export-hf / metrics commands on a run directory."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close

from gpt1 import GPT1, get_config
from gpt1.hf import load_hf, save_hf
from gpt1.tokenizer import GPT1Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXCERPT = os.path.join(ROOT, "tests", "data", "shakespeare")
ENV = {**os.environ, "PYTHONPATH": ROOT}


def random_model(vocab_size=320, seed=0):
    """gpt1-tiny with every parameter random (biases and LayerNorm included), so parity tests all of them."""
    torch.manual_seed(seed)
    model = GPT1(get_config("gpt1-tiny", vocab_size=vocab_size, attn_impl="eager", loss_impl="eager"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return GPT1Tokenizer.train([os.path.join(EXCERPT, "tempest.txt")], 320)


def test_export_matches_transformers_logits(tmp_path, tok):
    from transformers import OpenAIGPTLMHeadModel

    model = random_model()
    save_hf(model, str(tmp_path / "hf"), tok)
    assert {"config.json", "vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "hf"))
    hf = OpenAIGPTLMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, 320, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert_close(theirs, ours, atol=1e-5, rtol=0, name="logits")
    # the tokenizer loads as transformers' AutoTokenizer and encodes and decodes as ours
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "KING: What say'st thou?\n  Hark,<|endoftext|> 1,024 caf\u00e9s"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.eot_id, tok.pad_id)
    # and back: load_hf gives the same model
    again = load_hf(str(tmp_path / "hf"))
    assert again.config.architecture() == model.config.architecture()
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_load_hf_public_layout(tmp_path, prefix):
    """openai-gpt's published files: pytorch_model.bin, keys with or without `transformer.`, Conv1D weights."""
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    cfg = OpenAIGPTConfig(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(2)
    hf = OpenAIGPTLMHeadModel(cfg).eval()
    d = tmp_path / "openai-gpt"
    d.mkdir()
    cfg.to_json_file(str(d / "config.json"))
    state = {(prefix + k.removeprefix("transformer.")): v for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}
    torch.save(state, d / "pytorch_model.bin")
    ours = load_hf(str(d))
    ids = torch.randint(0, 300, (1, 64))
    with torch.no_grad():
        assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=0, name="logits")


def test_load_hf_errors(tmp_path):
    from gpt1.errors import GPT1Error

    with pytest.raises(GPT1Error, match="no config.json"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 300, "n_embd": 64, "n_layer": 1, "n_head": 4,
                                                      "n_positions": 16}))
    with pytest.raises(GPT1Error, match="neither model.safetensors nor pytorch_model.bin"):
        load_hf(str(tmp_path))
    torch.save({"tokens_embed.weight": torch.zeros(10, 64)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(GPT1Error, match="do not match its config.json: Missing key"):  # the reason, not a header
        load_hf(str(tmp_path))


def test_load_hf_double_heads_model_and_an_untied_head(tmp_path):
    """What transformers' OpenAIGPTDoubleHeadsModel saves (the tied matrix as lm_head.weight only, and a
    multiple-choice head) loads with its LM logits; an LM head of its own (tie_word_embeddings false) is refused
    rather than dropped."""
    from transformers import OpenAIGPTConfig, OpenAIGPTDoubleHeadsModel, OpenAIGPTLMHeadModel

    from gpt1.errors import GPT1Error

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    for name, cls, tie in (("double", OpenAIGPTDoubleHeadsModel, True), ("untied", OpenAIGPTLMHeadModel, False)):
        torch.manual_seed(3)
        cfg = OpenAIGPTConfig(vocab_size=300, n_positions=16, n_embd=48, n_layer=2, n_head=3, tie_word_embeddings=tie)
        hf = cls(cfg).eval()
        hf.save_pretrained(str(tmp_path / name))
        if tie:
            with torch.no_grad():
                assert_close(load_hf(str(tmp_path / name))(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
        else:
            with pytest.raises(GPT1Error, match="not tied to the token embedding"):
                load_hf(str(tmp_path / name))


def test_load_hf_unreadable_files_are_named(tmp_path):
    from gpt1.errors import GPT1Error

    save_hf(random_model(), str(tmp_path / "hf"))
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(GPT1Error, match="model.safetensors cannot be read"):
        load_hf(str(tmp_path / "hf"))
    weights.unlink()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(GPT1Error, match="pytorch_model.bin cannot be read"):
        load_hf(str(tmp_path / "hf"))
    (tmp_path / "hf" / "config.json").write_text("{")
    with pytest.raises(GPT1Error, match="config.json is not JSON"):
        load_hf(str(tmp_path / "hf"))
    (tmp_path / "file").write_text("kept")
    with pytest.raises(GPT1Error, match="is a file, not a directory"):
        save_hf(random_model(), str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "kept"


@pytest.fixture
def run_dir(tmp_path, tok):
    """A finished run directory as gpt1.train leaves it (config.json, model.pt, tokenizer/, metrics.jsonl)."""
    d = tmp_path / "run"
    model = random_model()
    tok.save(str(d / "tokenizer"))
    (d / "config.json").write_text(json.dumps({"model": model.config.to_dict()}))
    torch.save(model.state_dict(), d / "model.pt")
    rows = [{"step": 10, "loss": 5.0, "lr": 1e-3, "tokens_per_s": 100.0, "skipped_steps": 0},
            {"step": 20, "loss": 4.0, "lr": 1e-3, "tokens_per_s": 120.0, "skipped_steps": 0, "grad_norm": 0.8125,
             "mfu": 0.3912},
            {"step": 20, "val_loss": 4.5, "val_ppl": 90.0, "val_acc": 0.2}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "gpt1.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, check=False)


def test_cli_generate_is_seeded(run_dir):
    args = ["generate", "--run", run_dir, "--prompt", "KING:", "--max-new-tokens", "20", "--top-k", "50",
            "--top-p", "0.9", "--temperature", "0.9"]
    a, b, c = cli(*args, "--seed", "1"), cli(*args, "--seed", "1"), cli(*args, "--seed", "2")
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("KING:") and a.stdout == b.stdout != c.stdout


def test_cli_generate_on_a_cpu_from_a_run_with_gpu_kernels(run_dir):
    """A run trained with our Triton kernels (a GPU's choice) samples on a CPU without Triton's interpreter: the
    same model with torch's ops, as the eager run gives it."""
    args = ["generate", run_dir, "--prompt", "KING:", "--max-new-tokens", "8", "--device", "cpu"]
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    eager = subprocess.run([sys.executable, "-m", "gpt1.cli", *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, check=False)
    cfg_path = os.path.join(run_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["model"].update(attn_impl="triton", loss_impl="triton_linear", norm_impl="triton", mlp_impl="triton")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    fused = subprocess.run([sys.executable, "-m", "gpt1.cli", *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, check=False)
    assert eager.returncode == 0 and fused.returncode == 0, fused.stderr
    assert fused.stdout == eager.stdout


def test_cli_weights_of_another_config_name_the_keys(run_dir):
    cfg_path = os.path.join(run_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["model"]["n_layer"] += 1
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    res = cli("generate", run_dir)
    assert res.returncode == 2 and 'model.pt cannot be loaded: Missing key(s) in state_dict: "h.4.' in res.stderr, \
        res.stderr


def cli_here(capsys, *args):
    """(exit code, stdout, stderr) of `gpt1 ARGS` run in this process (no interpreter start-up per call)."""
    from gpt1.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_takes_the_run_directory_as_every_command_does(run_dir, tmp_path, capsys):
    """Every command that reads a run takes it positionally (`gpt1 metrics RUN`) or as --run RUN, generate too
    (which took only --run); export-hf's output also as --out. The same samples either way."""
    gen = ["--prompt", "KING:", "--max-new-tokens", "8", "--seed", "3"]
    positional, option = cli_here(capsys, "generate", run_dir, *gen), cli_here(capsys, "generate", "--run", run_dir,
                                                                                *gen)
    assert positional[0] == 0, positional[2]
    assert positional[1] == option[1] and positional[1].startswith("KING:")
    for args in ([run_dir, "--out", "a"], ["--run", run_dir, "b"], ["--run", run_dir, "--out", "c"]):
        out = str(tmp_path / (args[-1]))
        code, _, err = cli_here(capsys, "export-hf", *args[:-1], out)
        assert code == 0, (args, err)
        assert os.path.isfile(os.path.join(out, "config.json")), args
    assert cli_here(capsys, "metrics", "--run", run_dir)[1] == cli_here(capsys, "metrics", run_dir)[1] != ""


@pytest.mark.parametrize("args, msg", [
    (["generate", "--prompt", "x"], "the run directory is required"),
    (["generate", "RUN", "--run", "/elsewhere"], "two run directories given"),
    (["export-hf", "RUN"], "the output directory is required"),
    (["export-hf", "RUN", "x", "--out", "y"], "two output directories given"),
    (["metrics"], "the run directory is required"),
    (["checkpoint", "info"], "the run directory is required"),
])
def test_cli_run_directory_usage_errors(run_dir, args, msg, capsys):
    code, _, err = cli_here(capsys, *[run_dir if a == "RUN" else a for a in args])
    assert code == 2 and msg in err.strip().splitlines()[-1], err


def test_cli_export_hf(run_dir, tmp_path):
    from transformers import OpenAIGPTLMHeadModel

    res = cli("export-hf", run_dir, str(tmp_path / "hf"))
    assert res.returncode == 0, res.stderr
    hf = OpenAIGPTLMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    ours = random_model()
    ids = torch.randint(0, 320, (1, 50))
    with torch.no_grad():
        assert_close(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=0, name="logits")
    assert os.path.isfile(tmp_path / "hf" / "merges.txt")


def test_cli_export_hf_refuses_a_run_directory(run_dir, tmp_path):
    """OUT holding a run (the run itself, say) is refused and left as it was; an earlier export is written over."""
    before = {f: os.path.getmtime(os.path.join(run_dir, f)) for f in os.listdir(run_dir)}
    res = cli("export-hf", run_dir, run_dir)
    assert res.returncode == 2 and "holds a pre-training run; export into another directory" in res.stderr
    assert {f: os.path.getmtime(os.path.join(run_dir, f)) for f in os.listdir(run_dir)} == before
    for _ in range(2):
        assert cli("export-hf", run_dir, str(tmp_path / "hf")).returncode == 0


def test_cli_metrics_of_a_fine_tuning_run_and_a_cut_last_line(tmp_path):
    """A fine-tuning run's rows (two losses, no tokens/s; dev scores per epoch), and a last line cut by a kill,
    which is left out; a bad line elsewhere is a one-line error naming it."""
    rows = [{"step": 5, "loss": 0.9, "task_loss": 0.7, "lm_loss": 4.0, "lr": 1e-4},
            {"epoch": 1, "step": 5, "dev_acc": 0.75}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    res = cli("metrics", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "train loss 0.9000  task loss 0.7000  LM loss 4.0000" in res.stdout
    assert "epoch 1  dev acc 0.7500" in res.stdout
    (tmp_path / "metrics.jsonl").write_text('{"step": 6, "lo\n' + json.dumps(rows[0]) + "\n")
    res = cli("metrics", str(tmp_path))
    assert res.returncode == 2 and "metrics.jsonl, line 1: not a JSON row" in res.stderr, res.stderr


def test_cli_metrics(run_dir):
    res = cli("metrics", run_dir)
    assert res.returncode == 0, res.stderr
    assert "4.5" in res.stdout and "20" in res.stdout
    lines = res.stdout.splitlines()
    assert "grad norm 0.812" in lines[1] and "grad norm" not in lines[0]  # shown where the run logged it
    assert "MFU 39.1%" in lines[1] and "MFU" not in lines[0]


@pytest.mark.parametrize("args, msg", [
    (["generate", "--run", "/nonexistent"], "not a finished run directory"),
    (["generate", "--run", "RUN", "--top-p", "1.5"], "--top-p"),
    (["generate", "--run", "RUN", "--top-k", "-3"], "--top-k must be at least 1"),
    (["generate", "--run", "RUN", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["generate", "--run", "RUN", "--device", "bogus"], "--device bogus:"),
    (["generate", "--run", "RUN", "--device", "cuda"] if not torch.cuda.is_available() else ["generate", "--run",
     "RUN", "--device", f"cuda:{torch.cuda.device_count()}"], "--device cuda"),
    (["export-hf", "/nonexistent", "/tmp/x"], "not a finished run directory"),
    (["metrics", "/nonexistent"], "not found"),
    (["frobnicate"], "unknown command"),
])
def test_cli_errors(run_dir, args, msg):
    res = cli(*[run_dir if a == "RUN" else a for a in args])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and msg in lines[-1] and "Traceback" not in res.stderr, res.stderr


def test_a_config_of_no_run_is_one_line_error(run_dir):
    """A run directory whose config.json is not a run's (an HF export's, written over it) is named, not a KeyError."""
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"model_type": "openai-gpt"}, f)
    res = cli("generate", run_dir)
    assert res.returncode == 2 and "config.json is not a run config" in res.stderr and "Traceback" not in res.stderr


def test_load_hf_overrides_any_field_and_save_hf_refuses_a_run(tmp_path, run_dir):
    model = random_model()
    save_hf(model, str(tmp_path / "hf"))
    again = load_hf(str(tmp_path / "hf"), embd_pdrop=0.0, layer_norm_epsilon=1e-6, attn_impl="eager")
    assert (again.config.embd_pdrop, again.config.layer_norm_epsilon, again.config.attn_impl) == (0.0, 1e-6, "eager")
    from gpt1.errors import GPT1Error

    with pytest.raises(GPT1Error, match="holds a pre-training run"):
        save_hf(model, run_dir)
