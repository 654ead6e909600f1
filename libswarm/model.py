"""AutoDistributedModelForCausalLM: a Hugging Face causal LM whose transformer blocks run in the swarm.

Only the embeddings, the final norm and the LM head are loaded here; every block runs through
the local swarmd, which routes it over the servers. The class is a real `PreTrainedModel` with
`GenerationMixin`, so `generate()` takes every option Hugging Face's does (greedy, sampling,
top-k/top-p, temperature, repetition penalty, batches...).

Inside `with model.inference_session(max_length=...)`, the servers keep the attention caches:
each forward call sends only new positions, and several `generate()` calls continue one
another. Outside a session, a forward call runs the whole sequence without caches.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from libswarm import quantized, speculative
from libswarm.checkpoint import Checkpoint
from libswarm.client import SwarmClient
from libswarm.errors import ModelError, ProtocolError, SessionError, UnsupportedError, WrongModelError
from libswarm.layers import GemmaRMSNorm, RMSNorm, ScaledEmbedding, positions_from_mask
from libswarm.lora import LoraAdapters
from libswarm.protocol.messages import LEAN_BACKWARD_SINCE, speaks


class RemoteSession:
    """An inference session through the swarm: the gateway holds the route, servers the caches.

    `ids`/`mask` are every token the app has given or generated so far; `position` counts the
    ones the servers have processed (the last generated token is not processed until the next
    step)."""

    def __init__(self, model: DistributedModelForCausalLM, max_length: int, route_timeout_s: float | None = None,
                 push: bool = True, client: SwarmClient | None = None):
        self.model, self.max_length = model, max_length
        self.client = client or model.client
        self.route_timeout_s, self.push = route_timeout_s, push
        self.id: str | None = None
        self.route: list = []
        self.batch: int | None = None
        self.position = 0
        self.ids: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.closed = False
        self.beam_order: torch.Tensor | None = None  # a reordering of the cached rows, sent with the next step
        self.start: int | None = None  # the position the next step starts at, after a rollback

    def rollback(self, position: int) -> None:
        """Forget the positions from `position` on (drafted tokens that the model rejected): the
        servers and the gateway cut the session back with the next step."""
        if not 0 <= position <= self.position:
            raise SessionError(f"cannot cut the session back to {position}: it holds {self.position} positions")
        if position < self.position:
            self.position = self.start = position

    def reorder(self, order: torch.Tensor) -> None:
        """Beam search: row i of the next step continues the sequence cached as row order[i].
        The servers reorder their caches (and the gateway its history) with the next step."""
        order = order.to(torch.int64).cpu()
        self.beam_order = order if self.beam_order is None else self.beam_order[order]

    def _open(self, batch: int) -> None:
        reply = self.client.open_session(self.model.model_id, self.max_length, batch,
                                               route_timeout_s=self.route_timeout_s, push=self.push,
                                               adapter=self.model.adapter)
        self.id, self.route, self.batch = reply["session"], reply.get("route", []), batch

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        if self.closed:
            raise SessionError("the inference session is closed")
        B, T, _ = hidden.shape
        if self.id is None:
            self._open(B)
        if B != self.batch:
            raise SessionError(f"this session was opened for batch {self.batch}, got batch {B}")
        if self.position + T > self.max_length:
            raise SessionError(
                f"the session's max_length {self.max_length} is reached ({self.position} + {T} positions); "
                "open the session with a larger max_length"
            )
        assert self.id is not None
        out, info = self.client.step_with_info(self.id, hidden, position_ids, key_mask, self.beam_order,
                                                     self.start)
        self.beam_order = self.start = None
        self.route = info.get("route", self.route)  # changes when a server failed and was replaced
        self.position += T
        return out

    def close(self) -> None:
        if self.id is not None and not self.closed:
            with contextlib.suppress(Exception):  # the daemon frees it on its idle timeout anyway
                self.client.close_session(self.id)
        self.closed = True


class _RemoteLayer(CacheLayerMixin):
    """The attention caches of every block, as one layer of a Hugging Face `Cache`: they live on the
    servers, so this layer holds no tensors and answers from the session (its position, its
    max_length) and turns HF's cache edits into the session's: `crop` rolls the session back,
    `reorder_cache` reorders its rows with the next step. The blocks never run here, so `update`
    is never called; a call is a bug and says so."""

    is_compileable = False  # nothing here for torch.compile: the blocks run on the servers
    is_croppable = True  # the servers cut their caches back to any position, so a rollback leaves no trace
    is_sliding = False  # the servers apply any sliding window themselves, over the whole history
    supports_early_init = False  # nothing to allocate here

    def __init__(self, session: RemoteSession):
        super().__init__()
        self.session = session
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise UnsupportedError("the swarm's attention caches live on the servers: no block runs in this process")

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.session.position

    def get_max_length(self) -> int:
        return self.session.max_length

    get_max_cache_shape = get_max_length  # its name before transformers 5.17

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        # (kv_length, kv_offset): every cached position plus the new ones, from position 0.
        # Before 5.17 the argument is the new positions' cache_position tensor.
        n = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.session.position + n, 0

    def crop(self, n: int) -> None:
        """Assisted decoding drops rejected drafts: `n` < 0 removes -n positions (transformers
        5.17 and later); `n` > 0 keeps the first n (earlier versions)."""
        self.session.rollback(self.session.position + n if n <= 0 else min(n, self.session.position))

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.session.reorder(beam_idx)

    def reset(self) -> None:
        self.session.rollback(0)

    def activate_past_recording(self, *args, **kwargs) -> None:
        pass  # every past position stays on the servers until cropped

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise UnsupportedError("the swarm's caches cannot be repeated per row: run one generate() per input")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise UnsupportedError("the swarm's caches cannot drop rows: run one generate() per input")


class _SwarmCache(Cache):
    """What generate() sees of the attention caches: a Hugging Face `Cache` (the documented base
    class, so methods a release adds get the base's behaviour over our one layer) whose layer is
    the session that holds them on the servers."""

    def __init__(self, session: RemoteSession):
        super().__init__(layers=[_RemoteLayer(session)])
        self.session = session

    def get_seq_length(self, layer_idx: int | None = 0, *args, **kwargs) -> int:
        return self.session.position


class RemoteBlocks(torch.autograd.Function):
    """The swarm's blocks as one autograd node: forward through the gateway (which keeps each
    hop's input, and asks each server to keep its activations), and backward by sending the
    output's gradient with the forward's pass id (a daemon of protocol 1.6 has the pass's input
    and trainables; an older one, or one that dropped the pass, gets them again; servers
    differentiate what they kept, or recompute their blocks when they could not keep it).
    The client's LoRA parameters, if any, are inputs of the node, so they get gradients too."""

    @staticmethod
    def forward(ctx, hidden, positions, key_mask, model, *lora_params):  # type: ignore[override]
        ctx.model, ctx.positions, ctx.key_mask = model, positions, key_mask
        ctx.save_for_backward(hidden)
        out, fields = model.client.forward_with_info(model.model_id, hidden.detach(), positions, key_mask,
                                                     route_timeout_s=model.route_timeout_s, keep=True,
                                                     **model._lora_wire())
        ctx.pass_id = fields.get("pass")  # the gateway keeps each hop's input for backward
        ctx.lean = speaks(model.client.daemon_protocol, LEAN_BACKWARD_SINCE)  # and it (1.6) its inputs
        return out.to(hidden.device, hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (hidden,) = ctx.saved_tensors
        m = ctx.model
        got = None
        if ctx.pass_id is not None and ctx.lean:
            try:  # the gradient alone: the daemon has the forward's inputs and trainables
                got = m.client.backward_kept(m.model_id, grad_output.contiguous(), ctx.pass_id,
                                             route_timeout_s=m.route_timeout_s)
            except SessionError:
                pass  # not kept there any more: the whole backward
        grad, lora_grads = got or m.client.backward(
            m.model_id, hidden.detach(), grad_output.contiguous(), ctx.positions, ctx.key_mask,
            route_timeout_s=m.route_timeout_s, pass_id=ctx.pass_id, **m._lora_wire())
        trainables = m._trainables()
        missing = [n for n, _ in trainables if f"grad_{n}" not in lora_grads]
        if missing:
            raise ProtocolError(f"the swarm returned no gradient for {missing[0]}")
        return (grad.to(hidden.device, hidden.dtype), None, None, None,
                *(lora_grads[f"grad_{n}"].to(p.device, p.dtype) for n, p in trainables))


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PretrainedConfig
    base_model_prefix = "swarm"
    main_input_name = "input_ids"
    _supports_cache_class = False

    def __init__(self, config: PretrainedConfig, checkpoint: Checkpoint, client: SwarmClient, model_id: str):
        super().__init__(config)
        self.checkpoint, self.client, self.model_id = checkpoint, client, model_id
        self.family = checkpoint.family
        hidden, vocab = config.hidden_size, config.vocab_size
        gemma = config.model_type == "gemma3_text"
        with torch.device("meta"):
            self.embed_tokens = ScaledEmbedding(vocab, hidden, hidden ** 0.5) if gemma else nn.Embedding(vocab, hidden)
            if self.family == "bloom":
                self.embed_norm: nn.Module | None = nn.LayerNorm(hidden, eps=config.layer_norm_epsilon)
                self.norm: nn.Module = nn.LayerNorm(hidden, eps=config.layer_norm_epsilon)
            else:
                self.embed_norm = None
                self.norm = GemmaRMSNorm(hidden, config.rms_norm_eps) if gemma else RMSNorm(hidden, config.rms_norm_eps)
            self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self._local = threading.local()
        self.route_timeout_s: float | None = None  # None: the gateway's default (60 s)
        self.lora: LoraAdapters | None = None
        self.prompts: nn.ParameterDict | None = None
        self.adapter: str | None = None  # a LoRA adapter hosted by the servers (serve.adapters), by name

    # --- client-held LoRA ------------------------------------------------------------------------
    def add_lora(self, rank: int = 8, alpha: float = 16, target_modules=("q_proj", "v_proj")) -> LoraAdapters:
        """Trainable LoRA adapters for the remote blocks, held here (pass model.lora.parameters()
        to your optimizer). Targets are PEFT's module names, e.g. q_proj, v_proj, down_proj."""
        self.lora = LoraAdapters(self.config, self.family, self.checkpoint.num_layers, rank, alpha, target_modules)
        return self.lora

    def save_lora(self, directory: str) -> None:
        """Save the adapters in PEFT's format (loads with peft.PeftModel.from_pretrained)."""
        if self.lora is None:
            raise ValueError("no LoRA adapters: call add_lora() first")
        self.lora.save(directory, self.checkpoint.dir, self.checkpoint.layer_prefix)

    def add_prompts(self, num_tokens: int, deep: bool = False) -> nn.ParameterDict:
        """Trainable prompts held here: `input` [num_tokens, hidden] embeddings put before every
        input, and with `deep`, `deep` [num_layers, num_tokens, hidden] added to those positions'
        hidden states at the input of every block (servers add them for that call only). The
        outputs (logits) cover the caller's positions only."""
        if not isinstance(num_tokens, int) or num_tokens <= 0:
            raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
        h = self.config.hidden_size
        prompts = nn.ParameterDict({"input": nn.Parameter(torch.randn(num_tokens, h) * 0.02)})
        if deep:
            prompts["deep"] = nn.Parameter(torch.zeros(self.checkpoint.num_layers, num_tokens, h))
        self.prompts = prompts
        return prompts

    def _trainables(self) -> list[tuple[str, nn.Parameter]]:
        """The client's parameters that travel with forward and backward, by wire name."""
        out = list(self.lora.named_wire()) if self.lora is not None else []
        if self.prompts is not None and "deep" in self.prompts:
            out.append(("deep_prompts", self.prompts["deep"]))
        return out

    def _lora_wire(self) -> dict:
        trainables = self._trainables()
        if not trainables:
            return {}
        return {"lora": {name: p.detach() for name, p in trainables},
                "lora_scaling": self.lora.scaling if self.lora is not None else None}

    # --- the current session (per thread) -------------------------------------------------------
    @property
    def active_session(self) -> RemoteSession | None:
        return getattr(self._local, "session", None)

    @contextlib.contextmanager
    def inference_session(self, max_length: int, route_timeout_s: float | None = None,
                          push: bool = True, client: SwarmClient | None = None) -> Iterator[RemoteSession]:
        """Keep attention caches on the servers for up to max_length positions.

        route_timeout_s: how long the swarm may wait for servers to cover every block (at open,
        and while replacing a failed server) before raising NoRouteError; default 60 s.
        client: the `SwarmClient` this session uses (default: the model's, which gives each
        thread a connection of its own: threads with sessions of their own step at once)."""
        if self.active_session is not None:
            raise SessionError("an inference session is already active in this thread")
        sess = RemoteSession(self, max_length, route_timeout_s if route_timeout_s is not None else
                             self.route_timeout_s, push, client)
        self._local.session = sess
        try:
            yield sess
        finally:
            self._local.session = None
            sess.close()

    # --- weights -------------------------------------------------------------------------------------
    def _load_client_weights(self, dtype: torch.dtype, head_quant: str = "none") -> None:
        names = client_tensor_names(self.checkpoint)
        tensors = self.checkpoint.read(list(names.values()))
        state = {k: tensors[v].to(dtype) for k, v in names.items()}
        self.load_state_dict(state, assign=True, strict=True)
        if head_quant != "none":  # the float weight goes (the embeddings keep theirs when tied)
            self.lm_head = quantized.PackedLinear.from_linear(self.lm_head, 8 if head_quant == "int8" else 4, dtype)
        self.requires_grad_(False)
        self.eval()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # the servers hold the cache
        return False

    # --- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embed_tokens(input_ids)
        n_prompt = 0
        if self.prompts is not None:  # trainable prompts go before the caller's positions
            n_prompt = self.prompts["input"].shape[0]
            inputs_embeds = torch.cat([self.prompts["input"].to(inputs_embeds.dtype).expand(
                inputs_embeds.shape[0], -1, -1), inputs_embeds], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], n_prompt),
                                            attention_mask], dim=1)
            if position_ids is not None:
                raise ValueError("position_ids cannot be given with trainable prompts")
        hidden = inputs_embeds
        if self.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        B, T, _ = hidden.shape
        sess = self.active_session
        past = sess.position if sess is not None else 0
        key_mask = _new_mask(attention_mask, T)
        positions = self._positions(position_ids, attention_mask, past, B, T, hidden.device)
        if sess is not None:
            if self.lora is not None or self.prompts is not None:
                raise ValueError("client-held LoRA runs in forward passes (training, scoring), not in inference "
                                 "sessions or generate() yet; call model(...) without a session")
            out = sess.step(hidden, positions, key_mask)
        elif torch.is_grad_enabled() and (hidden.requires_grad or self._trainables()):
            # training: gradients flow through the swarm, to the input, LoRA and deep prompts
            out = RemoteBlocks.apply(hidden, positions, key_mask, self, *(p for _, p in self._trainables()))
        else:
            out = self.client.forward(self.model_id, hidden, positions, key_mask, route_timeout_s=self.route_timeout_s,
                                      adapter=self.adapter, **self._lora_wire())
        out = out.to(hidden.device, hidden.dtype)[:, n_prompt:]  # the client's parts may be on a GPU
        logits = self.lm_head(self.norm(out))
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        # in a session, generate() carries this handle between steps and asks it to reorder (beams)
        handle: dict[str, Any] = {CACHE_FIELD: _SwarmCache(sess)} if sess is not None else {}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **handle)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """Assisted decoding looks for a cache before its first step: the session's handle."""
        out = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)  # type: ignore[misc]
        mode = kwargs.get("generation_mode", args[0] if args else None)
        sess = self.active_session
        if mode == GenerationMode.ASSISTED_GENERATION and sess is not None and model_kwargs.get(CACHE_FIELD) is None:
            model_kwargs[CACHE_FIELD] = _SwarmCache(sess)
        return out

    def _positions(self, position_ids, attention_mask, past: int, B: int, T: int, device) -> torch.Tensor:
        """Position ids as the family's own Hugging Face model would use them."""
        if position_ids is not None:
            return position_ids[:, -T:].expand(B, T)
        if self.family == "bloom" and attention_mask is not None:
            # BLOOM's ALiBi counts real tokens only, so left padding does not shift positions
            return positions_from_mask(attention_mask)[:, -T:]
        return torch.arange(past, past + T, device=device).expand(B, T)

    # --- generate --------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, position_ids=None, inputs_embeds=None,
                                      **kwargs):
        sess = self.active_session
        past = sess.position if sess is not None else 0
        inputs: dict = {"attention_mask": attention_mask}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
            T = inputs_embeds.shape[1]
        else:
            inputs["input_ids"] = input_ids[:, past:]
            T = inputs["input_ids"].shape[1]
        if position_ids is not None:
            inputs["position_ids"] = position_ids[:, -T:]
        return inputs

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """Hugging Face generate(), running in the active inference session or in one opened for
        this call. In a session, pass either the whole sequence so far or only the new tokens."""
        self._check_generation_mode(kwargs)
        ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        sess = self.active_session
        if sess is None:
            if ids is None:
                raise ValueError("generate() needs input_ids")
            with self.inference_session(self._session_length(ids, kwargs)):
                self._local.own_session = True
                try:
                    return self.generate(ids, *args, **kwargs)
                finally:
                    self._local.own_session = False
        mask = kwargs.pop("attention_mask", None)
        ids, mask = _continue(sess, ids, mask)
        out = super().generate(ids, *args, attention_mask=mask, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        grown = sequences.shape[1] - ids.shape[1]
        sess.ids = sequences
        sess.mask = torch.cat([mask, mask.new_ones(mask.shape[0], grown)], dim=1)
        return out

    def _assisted_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                           streamer=None, inputs_tensor=None, assistant_model=None, assistant_tokenizer=None,
                           tokenizer=None, **model_kwargs):
        """Greedy decoding with `assistant_model=` runs libswarm's loop (libswarm/speculative.py):
        its draft goes on drafting while a pass is out, and a pass carries as many drafts as pay
        by what the loop measured, down to plain steps. Hugging Face's loop drafts and verifies in
        turn, a fixed schedule: slower than plain decoding through the swarm (docs/benchmarks.md).
        The tokens are the same. Sampling, a draft of another tokenizer, padding, and outputs
        beyond the sequences (scores, return_dict_in_generate) go to Hugging Face's loop."""
        sess = self.active_session
        mask, pos = model_kwargs.get("attention_mask"), model_kwargs.get("position_ids")
        ours = (sess is not None and assistant_model is not None and assistant_tokenizer is None and not synced_gpus
                and not generation_config.do_sample and not generation_config.return_dict_in_generate
                and getattr(generation_config, "assistant_ensemble_weight", None) is None
                and getattr(generation_config, "assistant_early_exit", None) is None
                and input_ids.shape[0] == 1 and sess.position < input_ids.shape[1]
                and (mask is None or bool(mask.all()))
                and (pos is None or torch.equal(pos.reshape(-1), torch.arange(pos.numel(), device=pos.device))))
        if not ours:
            return super()._assisted_decoding(  # type: ignore[misc]
                input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer,
                inputs_tensor, assistant_model, assistant_tokenizer, tokenizer, **model_kwargs)
        first_k = (generation_config.num_assistant_tokens or assistant_model.generation_config.num_assistant_tokens
                   or speculative.FIRST_DRAFT_TOKENS)
        return speculative.assisted_greedy(self, assistant_model, input_ids, logits_processor, stopping_criteria,
                                           generation_config.max_length, streamer, first_k)

    def _check_generation_mode(self, kwargs: dict) -> None:
        """Refuse, in one line and before anything runs, what generate() cannot do through the
        swarm: every mode but greedy and sampling needs the servers' caches reordered by beam
        or cut back to a position (beam search, assisted and prompt-lookup decoding, contrastive
        search), or per-block outputs the servers do not return (DoLa, hidden states, attention
        weights). HF would run them anyway and return other tokens than the whole model's."""
        import copy

        gc = copy.deepcopy(kwargs.get("generation_config") or self.generation_config)
        gc.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
        mode = gc.get_generation_mode(kwargs.get("assistant_model"))
        if mode not in SUPPORTED_GENERATION_MODES:
            raise UnsupportedError(
                f"generate(): {mode.value.replace('_', ' ')} is not supported through the swarm yet; use greedy "
                "decoding, sampling, beam search, or assisted decoding (assistant_model=, prompt_lookup_num_tokens=)")
        if mode in BEAM_MODES and self.active_session is not None and not getattr(self._local, "own_session", False):
            raise UnsupportedError("generate(): beam search runs in a session of its own (its beams cannot continue "
                                   "as one conversation): call generate() outside inference_session()")
        for flag in ("output_hidden_states", "output_attentions"):
            if getattr(gc, flag, False):
                raise UnsupportedError(f"generate(): {flag} is not supported through the swarm (the servers return "
                                       "only the last block's output)")

    def _session_length(self, ids: torch.Tensor, kwargs: dict) -> int:
        gc = kwargs.get("generation_config") or self.generation_config
        new = kwargs.get("max_new_tokens", gc.max_new_tokens)
        # assisted decoding verifies drafts that may run past the last token it keeps
        drafts = 0
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
            drafts = max(DRAFT_HEADROOM, 2 * int(kwargs.get("num_assistant_tokens") or gc.num_assistant_tokens or 0),
                         2 * int(kwargs.get("prompt_lookup_num_tokens") or 0))
        if new is not None:
            return ids.shape[1] + new + drafts
        return max(kwargs.get("max_length", gc.max_length or 0), ids.shape[1] + 1) + drafts


DRAFT_HEADROOM = 64  # positions a session opened by generate() keeps for drafts beyond max_new_tokens
CACHE_FIELD = speculative.CACHE_FIELD
BEAM_MODES = (GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE)
SUPPORTED_GENERATION_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.ASSISTED_GENERATION,
                              *BEAM_MODES)


def _new_mask(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """The key mask of the new positions, or None when nothing is padded (saves a frame)."""
    if attention_mask is None:
        return None
    m = attention_mask[:, -T:]
    return None if bool(m.all()) else m.bool()


def _continue(sess: RemoteSession, ids: torch.Tensor | None, mask: torch.Tensor | None):
    """Input ids (and mask) for generate() in a session that may already hold tokens."""
    if sess.ids is None:
        if ids is None:
            raise ValueError("generate() needs input_ids to start a session")
        return ids, mask if mask is not None else torch.ones_like(ids)
    done = sess.position
    assert sess.mask is not None
    if ids is None:
        return sess.ids, sess.mask
    if ids.shape[0] != sess.ids.shape[0]:
        raise SessionError(f"this session holds batch {sess.ids.shape[0]}, got input_ids of batch {ids.shape[0]}")
    if ids.shape[1] >= done and torch.equal(ids[:, :done], sess.ids[:, :done]):
        full_mask = mask if mask is not None else torch.cat(
            [sess.mask[:, :done], torch.ones_like(ids[:, done:])], dim=1)
        return ids, full_mask
    # only new tokens: they follow everything the session has seen, the pending token included
    new_mask = mask if mask is not None else torch.ones_like(ids)
    return torch.cat([sess.ids, ids], dim=1), torch.cat([sess.mask, new_mask], dim=1)


def client_tensor_names(ck: Checkpoint) -> dict[str, str]:
    """Our parameter name -> checkpoint tensor name for the parts that run on the client."""
    keys = ck.index
    if ck.family == "bloom":
        p = "transformer." if any(k.startswith("transformer.") for k in keys) else ""
        names = {
            "embed_tokens.weight": f"{p}word_embeddings.weight",
            "embed_norm.weight": f"{p}word_embeddings_layernorm.weight",
            "embed_norm.bias": f"{p}word_embeddings_layernorm.bias",
            "norm.weight": f"{p}ln_f.weight",
            "norm.bias": f"{p}ln_f.bias",
        }
    else:
        names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    names["lm_head.weight"] = "lm_head.weight" if "lm_head.weight" in keys else names["embed_tokens.weight"]
    return names


class AutoDistributedModelForCausalLM:
    """Entry point: `AutoDistributedModelForCausalLM.from_pretrained(model_dir, socket=...)`."""

    @staticmethod
    def from_pretrained(model_dir: str, socket: str | None = None, dtype: torch.dtype = torch.float32,
                        client: SwarmClient | None = None, adapter: str | None = None,
                        head_quant: str = "auto", **kwargs) -> DistributedModelForCausalLM:
        """The model of the checkpoint in `model_dir`, its blocks served by the swarm that the
        swarmd at `socket` belongs to; the embeddings, final norm and LM head run here in `dtype`.

        head_quant: the LM head's weights here, "none" (in `dtype`), "int8" (a scale per row) or
        "int4" (groups of 32 along the input), run by torch's packed CPU kernels. A token's step
        reads the whole head (151,936 x 1,536 for Qwen2.5's 1.5B: 933 MB in float32, 233 MB in
        int8), so on a CPU it costs as much as many blocks. "auto": int8 for a checkpoint whose
        blocks are stored quantized (a GGUF imported with --keep-quant), as llama.cpp keeps a
        Q4_K_M file's head in 6 bits; "none" otherwise. Packed heads run on CPUs only."""
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(kwargs)}")
        if head_quant not in ("auto", "none", "int8", "int4"):
            raise ValueError(f"head_quant {head_quant!r}: one of auto, none, int8, int4")
        ck = Checkpoint(model_dir)
        if head_quant == "auto":
            head_quant = "int8" if ck.stored_quant != "none" else "none"
        client = client or SwarmClient(socket=socket)
        info = client.model_info()
        model_id = ck.model_id
        if info["model_id"] != model_id:
            raise WrongModelError(
                f"{ck.dir} is model {model_id} but the swarmd at {client.socket_path} serves {info['model_id']}"
            )
        config = ck.config
        config.dtype = dtype
        model = DistributedModelForCausalLM(config, ck, client, model_id)
        model._load_client_weights(dtype, head_quant)
        try:
            model.generation_config = GenerationConfig.from_pretrained(ck.dir)
        except OSError:
            model.generation_config = GenerationConfig.from_model_config(config)
        if model.embed_tokens.weight.is_meta:
            raise ModelError(f"{ck.dir}: embeddings were not loaded")
        model.adapter = adapter  # a LoRA adapter the servers host (serve.adapters), picked by name
        return model
