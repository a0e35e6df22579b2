"""ChatGLM-6B's tokenizer on `ice_text.model` (sentencepiece), as a transformers `PreTrainedTokenizer`.

Rules (spec §4): newlines become the piece `<n>`, tabs `<|tab|>`, runs of 2-80 spaces `<|blank_N|>`
(longest first) before sentencepiece; decoding undoes this. Token id = sentencepiece id (the released
`tokenizer_config.json` sets `num_image_tokens` 0). Special tokens are pieces of the model, looked up by
text: `[MASK]` 130000, `[gMASK]` 130001, `[sMASK]` 130002, `<sop>` 130004 (bos), `<eop>` 130005 (eos),
`<unk>` 0, `<pad>` 3 in the real file. Encoding appends `[gMASK] <sop>` (and `answer + <eop>` for pairs).
Padding is on the left; the attention mask is the usual 2-D padding mask, from which the model builds the
official GLM mask and 2-D positions (`masks.py`), so `generate()` can grow it.

Decoding drops `<pad>` and ids past the sentencepiece vocabulary (the embedding has 130528 rows for
130344 pieces; issue #987), and does not apply transformers' `clean_up_tokenization` by default, so
text round-trips exactly.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import sentencepiece as spm
from transformers import PreTrainedTokenizer

MAX_BLANK_RUN = 80
_BLANK = re.compile(r"<\|blank_(\d+)\|>")


def encode_whitespace(text: str) -> str:
    """The official pre-processing: `\\n` -> `<n>`, `\\t` -> `<|tab|>`, runs of spaces -> `<|blank_N|>`."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for run in range(MAX_BLANK_RUN, 1, -1):
        text = text.replace(" " * run, f"<|blank_{run}|>")
    return text


def decode_whitespace(text: str) -> str:
    """Inverse of `encode_whitespace`."""
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    return _BLANK.sub(lambda match: " " * int(match.group(1)), text)


class ChatGLMTokenizer(PreTrainedTokenizer):
    """Same name as the official class, so the released `tokenizer_config.json` maps to it without remote code."""

    vocab_files_names = {"vocab_file": "ice_text.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str,
        do_lower_case: bool = False,
        remove_space: bool = False,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        end_token: str = "</s>",
        mask_token: str = "[MASK]",
        gmask_token: str = "[gMASK]",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        num_image_tokens: int = 0,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ):
        if num_image_tokens:
            raise ValueError(
                f"num_image_tokens={num_image_tokens}: this is the pre-2023-04-06 ChatGLM-6B tokenizer layout "
                "(ids shifted by 20000 for a 150528-row embedding); use the current THUDM/chatglm-6b files"
            )
        # The released tokenizer_config.json points AutoTokenizer at remote code; never save that back.
        kwargs.pop("auto_map", None)
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=str(vocab_file))
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        pieces = self.sp_model.id_to_piece(list(range(self.sp_model.get_piece_size())))
        self._pieces = {piece: index for index, piece in enumerate(pieces)}
        specials = {"bos": bos_token, "eos": eos_token, "mask": mask_token, "gmask": gmask_token, "pad": pad_token}
        absent = [f"{role} {str(token)!r}" for role, token in specials.items() if str(token) not in self._pieces]
        if absent:
            raise ValueError(f"{vocab_file}: special token(s) {', '.join(absent)} are not pieces of this model")
        self.gmask_token_id = self._pieces[str(gmask_token)]
        kwargs.setdefault("extra_special_tokens", [piece for piece in ("[sMASK]",) if piece in self._pieces])
        super().__init__(
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            bos_token=bos_token,
            eos_token=eos_token,
            end_token=end_token,
            mask_token=mask_token,
            gmask_token=gmask_token,
            pad_token=pad_token,
            unk_token=unk_token,
            num_image_tokens=num_image_tokens,
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {**self._pieces, **self._added_tokens_encoder}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return self.sp_model.encode(encode_whitespace(text), out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self._pieces.get(token, self.unk_token_id)

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < self.vocab_size:
            return self.sp_model.id_to_piece(index)
        return self.unk_token

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return decode_whitespace(self.sp_model.decode_pieces(tokens))

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        ids = [i for i in ids if i != self.pad_token_id and 0 <= i < self.vocab_size]
        return super()._decode(ids, skip_special_tokens, clean_up_tokenization_spaces, **kwargs)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """`a + [gMASK] + <sop>`, and `+ b + <eop>` for a pair (the official layout, also for labels)."""
        ids = token_ids_0 + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids) | {self.gmask_token_id}
            return [int(i in special) for i in token_ids_0]
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        target = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "") + "ice_text.model")
        if os.path.abspath(str(self.vocab_file)) != os.path.abspath(target):
            if os.path.isfile(self.vocab_file):
                shutil.copyfile(self.vocab_file, target)
            else:
                with open(target, "wb") as handle:
                    handle.write(self.sp_model.serialized_model_proto())
        return (target,)
