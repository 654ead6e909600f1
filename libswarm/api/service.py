"""What every request shares: the tokenizer, the distributed model and the draft model, each
loaded once (the model at the first request that needs it), with the keys, the slots and the
running completions; and what the model says of its context length and end-of-sequence tokens."""

from __future__ import annotations

import logging
import os
import threading

from libswarm.api.access import Keys
from libswarm.api.config import ApiConfig
from libswarm.api.engine import Completion
from libswarm.api.slots import Slots
from libswarm.client import SwarmClient
from libswarm.errors import ModelError

log = logging.getLogger("swarm-api")


class Service:
    """The model's client side (embeddings, head, tokenizer), loaded once and shared by every
    request; each request decodes in its own thread, session and connection."""

    def __init__(self, config: ApiConfig, model=None, tokenizer=None):
        self.config = config
        self.settings = config.api
        self.keys = Keys(config.api.keys_file)
        self._model, self.tokenizer = model, tokenizer
        self._draft = None
        self._load_lock = threading.Lock()
        self.status_client = SwarmClient(socket=config.socket, timeout_s=10.0)
        self.slots = Slots(config.api.max_concurrent, config.api.max_queued)
        self.jobs: set[Completion] = set()  # running completions, cancelled when swarm-api stops
        self.created = int(os.stat(config.model).st_mtime)
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(config.model)
            except Exception as e:  # transformers raises OSError, ValueError and more for a bad directory
                line = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
                raise ModelError(f"{config.model}: cannot load the model's tokenizer: {line}") from None
        threading.Thread(target=self._warm, name="load", daemon=True).start()

    def _warm(self) -> None:
        """Load the model's client side now rather than at the first request, if swarmd answers."""
        try:
            self.model()
            self.draft()
        except Exception as e:  # the first request that needs the model says what is wrong
            log.warning("not connected to swarmd yet: %s", str(e).splitlines()[0] if str(e) else e)

    def model(self):
        """The distributed model; loaded at the first request that needs it (swarmd may start
        after swarm-api, or restart under it)."""
        with self._load_lock:
            if self._model is None:
                from libswarm import AutoDistributedModelForCausalLM

                self._model = AutoDistributedModelForCausalLM.from_pretrained(self.config.model,
                                                                             socket=self.config.socket)
            return self._model

    def draft(self):
        """The draft model (api.draft_model), loaded with the model; None without one. Its
        tokenizer must be the model's: a draft of other token ids would never be accepted."""
        path = self.settings.draft_model
        if path is None:
            return None
        with self._load_lock:
            if self._draft is None:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                from libswarm.checkpoint import Checkpoint

                if Checkpoint(path).stored_quant != "none":  # transformers would fill those weights at random
                    raise ModelError(f"api.draft_model {path}: its blocks are stored quantized (imported with "
                                     "--keep-quant), which the local draft cannot load; import it without")
                try:
                    vocab = AutoTokenizer.from_pretrained(path).get_vocab()
                    draft = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
                except Exception as e:  # transformers raises many kinds for a bad directory
                    line = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
                    raise ModelError(f"api.draft_model {path}: cannot load it: {line}") from None
                if vocab != self.tokenizer.get_vocab():
                    raise ModelError(f"api.draft_model {path}: its tokenizer is not the model's "
                                     f"({len(vocab)} and {len(self.tokenizer.get_vocab())} tokens, or other ids)")
                if self.settings.draft_quant != "none":
                    from libswarm.speculative import packed_draft

                    packed_draft(draft, self.settings.draft_quant)
                self._draft = draft
            return self._draft

    def vocab_size(self) -> int:
        return int(self.model().config.vocab_size)

    @property
    def model_id(self) -> str | None:
        return self._model.model_id if self._model is not None else None

    def context(self, model) -> int:
        return int(getattr(model.config, "max_position_embeddings", 0) or 2048)

    def eos(self, model) -> set[int]:
        ids: set[int] = set()
        for source in (model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(x) for x in source)
        return ids
