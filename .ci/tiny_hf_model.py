"""CI helper for the wheel check (needs the ``hf`` extra).

    python tiny_hf_model.py make HF_DIR       a tiny random Qwen2 model (GQA, QKV bias, tied embeddings)
    python tiny_hf_model.py compare A B       B must hold A's tensors exactly, and load in transformers
                                              with A's logits
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config


def make(folder: Path) -> None:
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=250, max_position_embeddings=64, rope_theta=1e6,
                      tie_word_embeddings=True, rms_norm_eps=1e-6)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)


def tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        sys.exit(f"round trip changed the tensor names: only in {a}: {sorted(set(ta) - set(tb))}; "
                 f"only in {b}: {sorted(set(tb) - set(ta))}")
    changed = [n for n in ta if not torch.equal(ta[n], tb[n])]
    if changed:
        sys.exit(f"round trip changed {len(changed)} tensors, e.g. {changed[:3]}")
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = (AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits for d in (a, b))
    if not torch.equal(la, lb):
        sys.exit(f"logits differ after the round trip: max |diff| {float((la - lb).abs().max()):.3g}")
    print(f"round trip: {len(ta)} tensors identical, logits identical")


if __name__ == "__main__":
    if sys.argv[1:2] == ["make"] and len(sys.argv) == 3:
        make(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        compare(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)
