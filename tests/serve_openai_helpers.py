"""A tiny Llama with SmolLM2's tokenizer (it has a chat template) and adapters of five methods,
saved to folders, for the OpenAI endpoint tests; and the reference: ``generate`` alone."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
import transformers

from adapterkit import AdapterModel
from adapterkit.loader import load_tokenizer

#: adapter name -> (method or preset, options)
METHODS = {"lora": ("lora", {"r": 4}), "bn": ("pfeiffer", {}), "ia3": ("ia3", {}),
           "prefix": ("prefix_tuning", {"prefix_length": 4, "bottleneck_size": 16}),
           "prompt": ("prompt_tuning", {"prompt_length": 5}), "union": ("pfeiffer+prompt_tuning", {}),
           "prompt3": ("prompt_tuning", {"prompt_length": 3}), "par": ("par_bn", {})}


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer saved once per test process (reading it from the GGUF takes ~20 s)."""
    folder = Path(tempfile.mkdtemp(prefix="adapterkit-smollm2-tok-"))
    load_tokenizer("smollm2").save_pretrained(folder)
    return folder


def make_chat_llama(root: Path, hot: tuple[str, ...] = ()) -> tuple[Path, dict[str, Path]]:
    """A tiny random Llama at ``root/llama`` (SmolLM2's vocabulary and tokenizer) and every adapter
    of ``METHODS`` saved under ``root/adapters`` (those named in ``hot`` under ``root/hot``)."""
    base = root / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=49152, max_position_embeddings=512, eos_token_id=2, bos_token_id=1)).save_pretrained(base)
    transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(base)
    model = AdapterModel.from_pretrained(str(base))
    for name, (method, options) in METHODS.items():
        model.add_adapter(name, method, **options)
    torch.manual_seed(1)
    for p in model.adapters.parameters():
        torch.nn.init.normal_(p, std=0.5)
    dirs = {}
    for name in METHODS:
        dirs[name] = root / ("hot" if name in hot else "adapters") / name
        model.save_adapter(dirs[name], name)
    return base, dirs


class Reference:
    """``generate`` alone, greedy, on the saved model with each adapter loaded."""

    def __init__(self, base: Path, dirs: dict[str, Path]):
        self.model = AdapterModel.from_pretrained(str(base)).eval()
        for name, folder in dirs.items():
            self.model.load_adapter(folder, load_as=name)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(base)

    def ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.ids(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    @torch.inference_mode()
    def generate(self, ids: list[int], adapter, max_tokens: int) -> tuple[str, int]:
        """The text and the number of tokens ``generate`` gives alone."""
        x = torch.tensor([ids])
        out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=[adapter],
                                  max_new_tokens=max_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)[0, len(ids):]
        return self.tokenizer.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False), len(out)
