"""Run a pruned checkpoint in ONNX Runtime: export it with ``torch.onnx.export`` (the dynamo exporter),
run it with onnxruntime, check its logits against transformers'.

    python examples/deploy_onnxruntime.py --tiny                          # tiny PAT-pruned Llama (48 wide, head_dim 32)
    python examples/deploy_onnxruntime.py --model outputs/quickstart/pruned

What it needs (a separate environment; the package's pins stay untouched):

    pip install torch==2.13.0 -e . onnxruntime onnxscript onnx

``optimum-onnx`` (0.1.0) is not used: it requires transformers < 4.58, the package pins 5.x. The export
is of the logits of a full forward (no KV cache): a correctness path, not a serving setup.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from deploy_llamacpp import tiny_pruned_folder  # the sibling script: this folder is on sys.path when run as a file

MISSING = (
    "ONNX export/runtime needs onnxruntime, onnx and onnxscript ({error}); install them in a separate "
    "environment: pip install torch==2.13.0 -e . onnxruntime onnxscript onnx"
)


def _require() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(MISSING.format(error=error)) from error


def export(folder: Path, outfile: Path, max_tokens: int = 512) -> Path:
    """ONNX graph ``input_ids (1, seq) -> logits (1, seq, vocab)`` of a saved causal LM, seq dynamic."""
    _require()
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    class Logits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, use_cache=False).logits

    seq = torch.export.Dim("seq", min=2, max=max_tokens)
    example = torch.tensor([[1, 5, 9, 13, 20, 33, 40, 7]]) % model.config.vocab_size
    Path(outfile).parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        Logits(model).eval(),
        (example,),
        str(outfile),
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {1: seq}},
        dynamo=True,
    )
    return Path(outfile)


def compare(folder: Path, onnx_file: Path, ids: list[int]) -> dict:
    """Logit agreement of transformers (float32) and ONNX Runtime on the same token ids."""
    _require()
    import onnxruntime
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    engine = session.run(None, {"input_ids": np.array([ids], dtype=np.int64)})[0][0]
    return {
        "tokens": len(ids),
        "max_abs_logit_diff": float(np.abs(reference - engine).max()),
        "max_abs_logit": float(np.abs(reference).max()),
        "argmax_agreement": float((reference.argmax(-1) == engine.argmax(-1)).mean()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a pruned folder saved by save_pruned / save_pretrained")
    source.add_argument("--tiny", action="store_true", help="tiny random Llama pruned by PAT (default)")
    parser.add_argument("--output", default="outputs/deploy_onnxruntime")
    parser.add_argument("--tokens", type=int, default=23)
    args = parser.parse_args(argv)

    out = Path(args.output)
    folder = Path(args.model) if args.model else tiny_pruned_folder(out / "pruned")
    onnx_file = export(folder, out / "model.onnx")
    config = json.loads((folder / "config.json").read_text())
    ids = [int(i) for i in np.random.default_rng(0).integers(3, config["vocab_size"], size=args.tokens)]
    summary = {"folder": str(folder), "onnx": str(onnx_file), "hidden_size": config["hidden_size"]}
    summary.update(compare(folder, onnx_file, ids))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
