"""Write a checkpoint as one GGUF file, the format llama.cpp and Ollama run.

    python Utilities/export-gguf.py output/final-checkpoint model.gguf                # f16 matrices
    python Utilities/export-gguf.py output/final-checkpoint model-f32.gguf --dtype f32 --overwrite

The file holds the "llama" architecture and its settings, every weight under llama.cpp's tensor name (query and
key rows reordered as llama.cpp's own converter reorders them), and the tokenizer as llama.cpp's sentencepiece
vocabulary, from the checkpoint's tokenizer.model: it encodes text to the same ids as the checkpoint's
tokenizer.json. It is written under a temporary name and renamed into place, so a failed export leaves nothing.
See "Using the model elsewhere" in README.md for llama.cpp and Ollama commands.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the suite's root, where pretrain/ lies

from pretrain.errors import run_main  # noqa: E402
from pretrain.export.gguf import main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
