"""Write a checkpoint as one GGUF file, the format llama.cpp and Ollama run.

    python Utilities/export-gguf.py output/final-checkpoint model.gguf                # f16 matrices
    python Utilities/export-gguf.py output/final-checkpoint model-f32.gguf --dtype f32 --overwrite
    python Utilities/export-gguf.py output/final-checkpoint q4/model-q4_0.gguf --dtype q4_0   # 4-bit, in q4/

The file holds the "llama" architecture and its settings, every weight under llama.cpp's tensor name (query and
key rows reordered as llama.cpp's own converter reorders them), and the tokenizer as llama.cpp's sentencepiece
vocabulary, from the checkpoint's tokenizer.model: it encodes text to the same ids as the checkpoint's
tokenizer.json. --dtype picks f32, f16, bf16 or a quantized type (q8_0, q5_1, q5_0, q4_1, q4_0); norms stay f32
and, under the 4- and 5-bit types, the output matrix q8_0, as llama.cpp keeps them. Beside the file goes an Ollama
Modelfile (`ollama create NAME -f Modelfile`). Both are written under temporary names and renamed into place, so a
failed export leaves nothing. docs/gguf.md lists the types with their sizes and perplexities.
See docs/using-the-model.md for llama.cpp and Ollama commands.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the suite's root, where pretrain/ lies

from pretrain.errors import run_main  # noqa: E402
from pretrain.export.gguf import main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
