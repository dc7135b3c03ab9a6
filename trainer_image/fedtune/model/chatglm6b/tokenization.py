"""ChatGLM-6B's tokenizer: `ice_text.model` (sentencepiece) as upstream's `tokenization_chatglm.py` uses it.

The same ids as upstream under transformers 4.33: newlines become `<n>`, tabs `<|tab|>` and runs of 2-80
spaces `<|blank_N|>` before sentencepiece sees the text; ids are offset by `num_image_tokens`; a text ends
with `[gMASK] <sop>` (an answer after it with `<eop>`); `<sop>`, `<eop>`, `[MASK]`, `<pad>` and `<unk>` in a
text are those tokens (upstream's special tokens), `[gMASK]` is plain text there. Padding is on the left.

One difference: upstream's tokenizer also returns 3D attention masks and 2D positions when it pads; this
one returns the usual (batch, seq) mask, from which `modeling` derives both.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, ClassVar

import sentencepiece as spm
from transformers import PreTrainedTokenizer
from transformers.tokenization_python import Trie

VOCAB_FILE = "ice_text.model"
MAX_BLANK = 80


class ChatGLM6BTokenizer(PreTrainedTokenizer):
    vocab_files_names: ClassVar[dict[str, str]] = {"vocab_file": VOCAB_FILE}
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, bos_token: str = "<sop>", eos_token: str = "<eop>", end_token: str = "</s>",
                 mask_token: str = "[MASK]", gmask_token: str = "[gMASK]", pad_token: str = "<pad>",
                 unk_token: str = "<unk>", num_image_tokens: int = 20000, padding_side: str = "left",
                 do_lower_case: bool = False, remove_space: bool = False, **kwargs: Any) -> None:
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(vocab_file)
        self.num_image_tokens = int(num_image_tokens)
        self.gmask_token, self.end_token = gmask_token, end_token
        self.do_lower_case, self.remove_space = do_lower_case, remove_space
        self._split = re.compile("(" + "|".join(re.escape(str(t)) for t in (bos_token, eos_token, mask_token, pad_token,
                                                                     unk_token)) + ")")
        for key in ("auto_map", "name_or_path"):
            kwargs.pop(key, None)
        super().__init__(bos_token=bos_token, eos_token=eos_token, mask_token=mask_token, pad_token=pad_token,
                         unk_token=unk_token, padding_side=padding_side, **kwargs)
        self.init_kwargs.update(gmask_token=gmask_token, end_token=end_token, num_image_tokens=self.num_image_tokens,
                                do_lower_case=do_lower_case, remove_space=remove_space)
        self._plain_text(str(gmask_token), str(end_token))

    def _plain_text(self, *contents: str) -> None:
        """Upstream (transformers 4.33) never split these out of a text; transformers 5 makes every `*_token` of
        tokenizer_config.json a special token that is: undo that."""
        for index, token in list(self._added_tokens_decoder.items()):
            if str(token) in contents:
                del self._added_tokens_decoder[index]
                self._added_tokens_encoder.pop(str(token), None)
        self.tokens_trie = Trie()  # it only ever grows
        self._update_trie()

    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp.vocab_size()

    @property
    def gmask_token_id(self) -> int:
        return self._convert_token_to_id(self.gmask_token)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _preprocess(self, text: str) -> str:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for width in range(MAX_BLANK, 1, -1):
            text = text.replace(" " * width, f"<|blank_{width}|>")
        return text

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """Upstream's special tokens stand alone; each piece of text between them is encoded on its own."""
        tokens: list[str] = []
        for part in self._split.split(text):
            if part in self.all_special_tokens:
                tokens.append(part)
            elif part:
                tokens += self.sp.EncodeAsPieces(self._preprocess(part))
        return tokens

    def _convert_token_to_id(self, token: str) -> int:
        if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            return int(token[7:-1])
        return self.sp.PieceToId(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp.IdToPiece(index - self.num_image_tokens)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        text = self.sp.DecodePieces(tokens).replace("<n>", "\n").replace("<|tab|>", "\t")
        for width in range(2, MAX_BLANK + 1):
            text = text.replace(f"<|blank_{width}|>", " " * width)
        return text

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        ids = [i for i in ids if i != self.pad_token_id and i >= self.num_image_tokens]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        return self.convert_tokens_to_string([self._convert_id_to_token(i) for i in ids])

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        ids = [*token_ids_0, self.gmask_token_id, self.bos_token_id]
        return [*ids, *token_ids_1, self.eos_token_id] if token_ids_1 is not None else ids

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return [1 if i in self.all_special_ids or i == self.gmask_token_id else 0 for i in token_ids_0]
        mask = [0] * len(token_ids_0) + [1, 1]
        return mask + [0] * len(token_ids_1) + [1] if token_ids_1 is not None else mask

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = f"{filename_prefix}-{VOCAB_FILE}" if filename_prefix else VOCAB_FILE
        target = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
