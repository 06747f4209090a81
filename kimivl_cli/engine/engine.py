"""The generation engine: one loaded model, prompts in, streamed tokens and events out.

A request runs in three phases:

1. vision: images are hashed; unseen ones go through MoonViT + projector in chunks of at most
   `patch_budget` patches, and their features are remembered (`vision_cache`).
2. prefill: the prompt runs through the language model in chunks of `prefill_chunk` tokens,
   writing the MLA latent cache. Embeddings are built per chunk and logits are taken for the last
   position only, so a 100K-token prompt costs O(chunk x (D + L)) transient memory: no L x vocab
   logits and (the model's attention works in query blocks) no L x L scores.
3. decode: one token per step through `decode_step`, absorbed MLA attention over the cache.

The cache is preallocated once to prompt + max_new_tokens (capped by the context) and never
grows. Legend: B batch, T tokens in a step, L prompt length, V vocab, D text hidden.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from PIL import Image

from kimivl_cli.engine.context import plan_context
from kimivl_cli.engine.cpu_decode import NativeDecoder
from kimivl_cli.engine.events import AnswerDelta, Done, Event, JsonFormat, Timings, Usage
from kimivl_cli.engine.grammar import Grammars, JsonGuide
from kimivl_cli.engine.graph import DecodeGraph, cache_bucket
from kimivl_cli.engine.sampling import SamplingParams, is_thinking_model, make_generator, sample
from kimivl_cli.engine.stream import Phase, StopText, ThinkingBudget, ThinkingSplitter
from kimivl_cli.engine.vision_cache import DEFAULT_CACHE_BYTES, DEFAULT_PATCH_BUDGET, FeatureCache, encode_images
from kimivl_cli.errors import CheckpointError, InputError
from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.config import KimiVLConfig
from kimivl_cli.processor.chat import THINK_END, THINK_START, Message, encode_chat
from kimivl_cli.processor.image import ImageProcessorConfig, ProcessedImages, process_images
from kimivl_cli.processor.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kimivl_cli.model.weights import LoadProgress

DEFAULT_PREFILL_CHUNK = 1024
FinishReason = Literal["stop", "length", "interrupted"]


@dataclass
class GenerationStats:
    """What one request cost; filled in while its `TokenStream` runs."""

    prompt_tokens: int = 0
    image_tokens: list[int] = field(default_factory=list)
    images_encoded: int = 0
    generated_tokens: int = 0
    cache_bytes: int = 0  # the MLA latent cache: layers x slots x (R + Dr) x dtype size
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: FinishReason = "length"


@dataclass
class _Decoding:
    """What one request's decode steps read: sampling, stops, the cache (in the held graph, if any),
    the generator and the ids so far [1, cache_len] (for the repetition penalty)."""

    params: SamplingParams
    stop: frozenset[int]
    max_new: int
    cache: LatentCache
    graph: DecodeGraph | None
    generator: torch.Generator | None
    history: torch.Tensor


class TokenStream:
    """The generated ids of one request, one per iteration (stop tokens are not yielded).

    `force(ids)` makes the next tokens `ids` instead of samples (e.g. to end a thinking block);
    they run through the model like any token and are yielded too. `guide`, once active, masks
    every sampled step to what its grammar allows. `stats` is complete once the iteration ends;
    `logits` holds each sampled step's fp32 logits [V] when asked for; `max_new` is the most
    tokens it yields.
    """

    def __init__(
        self,
        run: Callable[[TokenStream], Iterator[int]],
        stats: GenerationStats,
        keep_logits: bool,
        max_new: int,
        guide: JsonGuide | None = None,
    ) -> None:
        self.stats = stats
        self.max_new = max_new
        self.guide = guide
        self.forced: list[int] = []
        self.logits: list[torch.Tensor] | None = [] if keep_logits else None
        self._steps = run(self)  # a generator: nothing runs before the first `next`

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> int:
        return next(self._steps)

    def force(self, ids: Sequence[int]) -> None:
        self.forced.extend(ids)

    @property
    def left(self) -> int:
        """Tokens it may still yield."""
        return self.max_new - self.stats.generated_tokens

    def close(self) -> None:
        """Stop early (`stats.finish_reason` becomes 'interrupted'); the cache is freed."""
        self._steps.close()


class Engine:
    """Model + tokenizer + image-processor settings on one device, in one dtype.

    Build with `Engine.load(folder_or_repo)`; then `generate(messages, images)` streams events,
    `generate_ids(input_ids, pixel_values, grid_hws)` streams token ids (no tokenizer needed).
    Image features are cached across requests (`feature_cache`), so a follow-up question on the
    same image or page skips the vision tower.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: KimiVLConfig,
        tokenizer: Tokenizer | None = None,
        image_config: ImageProcessorConfig | None = None,
        defaults: SamplingParams | None = None,
        name: str = "",
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        patch_budget: int = DEFAULT_PATCH_BUDGET,
        feature_cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.image_config = image_config or ImageProcessorConfig.official()
        self.defaults = defaults or SamplingParams()
        self.notes: list[str] = []  # what loading changed of what was asked, for the user
        self.name = name
        self.thinking = is_thinking_model(name)
        self.prefill_chunk = prefill_chunk
        self.patch_budget = patch_budget
        self.feature_cache = FeatureCache(feature_cache_bytes)
        lm = model.language_model
        self.lm = lm
        self.dtype = lm.model.embed_tokens.weight.dtype
        self.device = lm.model.embed_tokens.weight.device
        # On CUDA one-token steps replay CUDA graphs (`graph.py`); off, they run eagerly (tests compare).
        self.cuda_graphs = self.device.type == "cuda"
        # One-token steps on CUDA run as fused Triton kernels when they cover the model.
        self.fused_decode = None
        if self.device.type == "cuda":
            from kimivl_cli.model.fused_decode import FusedDecoder  # imports Triton: only where there is a GPU

            self.fused_decode = FusedDecoder.build(lm)
        self._graph: DecodeGraph | None = None  # the latest bucket's graph and cache, kept across requests
        self._grammars: Grammars | None = None
        # On CPU one-token steps of one sequence run as one native call (`cpu_decode.py`) where it applies.
        self._native_decode = NativeDecoder.build(lm) if self.device.type == "cpu" else None

    @classmethod
    def load(
        cls,
        path_or_repo: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        quant: str = "none",
        lm_head: str | None = None,
        progress: LoadProgress | None = None,
        **kwargs,
    ) -> Engine:
        """Load weights, tokenizer, `preprocessor_config.json` and `generation_config.json` defaults.

        quant "nf4" | "int8" quantizes the language model's linears while loading (model/weights.py);
        `progress` shows the weights as they load. lm_head "int8" | "nf4" quantizes the output head
        after loading (default: $KIMIVL_LM_HEAD, else "bf16": kept). Off by default: on random-weight
        models neither keeps 99.5% top-1 agreement with the bf16 head (benchmarks/lm_head_quant.py).
        """
        from kimivl_cli.guards import inside
        from kimivl_cli.model.weights import load_model, resolve_checkpoint
        from kimivl_cli.quant.modules import quantize_lm_head_

        folder = resolve_checkpoint(path_or_repo)
        # The small files first: a broken tokenizer or config fails before the weights load.
        config = KimiVLConfig.from_file(inside(folder, "config.json"))
        tokenizer = Tokenizer.from_dir(folder)
        image_config = ImageProcessorConfig.from_file(inside(folder, "preprocessor_config.json"))
        check_agreement(config, tokenizer, image_config)
        defaults = SamplingParams.from_checkpoint(folder, thinking=is_thinking_model(path_or_repo))
        model, config = load_model(folder, dtype=dtype, device=device, quant=quant, progress=progress)
        quantize_lm_head_(model.language_model, lm_head or os.environ.get("KIMIVL_LM_HEAD") or "bf16")
        return cls(
            model,
            config,
            tokenizer=tokenizer,
            image_config=image_config,
            defaults=defaults,
            name=str(path_or_repo),
            **kwargs,
        )

    # --- ids ---------------------------------------------------------------------------------

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """`<|im_end|>` and `[EOS]` from the tokenizer, else the config's eos id."""
        if self.tokenizer is not None:
            return (self.tokenizer.im_end_id, self.tokenizer.eos_id)
        eos = self.config.text.eos_token_id
        return () if eos is None else (eos,)

    @property
    def grammars(self) -> Grammars:
        """The JSON grammars over this engine's tokenizer (built on first use: imports xgrammar)."""
        if self._grammars is None:
            stops = [*self.stop_ids, *self.defaults.stop_token_ids]
            self._grammars = Grammars(self._require_tokenizer(), self.config.text.vocab_size, stops)
        return self._grammars

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise InputError("this engine has no tokenizer", "load it with Engine.load(checkpoint_folder)")
        return self.tokenizer

    # --- model phases ------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """Per-image features [T_i, D] (cached by content) and how many images ran the encoder."""
        kh, kw = self.config.vision.merge_kernel_size

        def encode(pv: torch.Tensor, grids: torch.Tensor) -> list[torch.Tensor]:
            feats = self.model.encode_images(pv.to(self.device), grids)
            return list(feats.split([(h // kh) * (w // kw) for h, w in grids.tolist()]))

        return encode_images(encode, pixel_values, grid_hws, self.feature_cache, self.patch_budget)

    def prefill(self, input_ids: torch.Tensor, features: torch.Tensor | None, cache: LatentCache) -> torch.Tensor:
        """Run input_ids [B, L] (features [F, D] over its pads, in order) into `cache` chunk by chunk;
        -> fp32 logits [B, V] of the last position. One host sync per chunk (placeholder count)."""
        L = input_ids.shape[1]
        is_pad = (input_ids == self.config.media_placeholder_token_id).cpu()
        used = 0
        hidden = None
        for start in range(0, L, self.prefill_chunk):
            ids = input_ids[:, start : start + self.prefill_chunk]
            n_pad = int(is_pad[:, start : start + ids.shape[1]].sum())
            chunk_feats = None if features is None else features[used : used + n_pad]
            embeds = self.model.embed(ids, chunk_feats)
            used += n_pad
            hidden = self.lm(embeds, start, cache)
        return self.lm.logits(hidden[:, -1])

    def decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor | int, cache: LatentCache, kv_len: int
    ) -> torch.Tensor:
        """tokens [B, T], positions [B, T] (or the int start of all rows) -> fp32 logits [B, V] of
        the last token; writes T cache rows.

        No host-device sync on CUDA (one token: the fused decode kernels, which attend up to the
        position read on the device; more: the MoE's fused kernels), and with positions a tensor and
        a fixed `kv_len` every shape is static: the unit to capture in a CUDA graph.
        """
        if self.fused_decode is not None and tokens.shape == (1, 1):
            if isinstance(positions, int):
                positions = torch.full((1, 1), positions, device=self.device)  # a fill: no host copy
            return self.fused_decode(tokens, positions, cache)
        if self._native_decode is not None and self._native_decode.applies(tokens, positions, cache, kv_len):
            return self._native_decode.step(int(tokens), positions, cache)
        hidden = self.lm(self.lm.embed(tokens), positions, cache, kv_len)
        return self.lm.logits(hidden[:, -1])

    # --- token-level generation --------------------------------------------------------------

    def generate_ids(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        grid_hws: torch.Tensor | None = None,
        params: SamplingParams | None = None,
        *,
        stop_ids: Sequence[int] | None = None,
        max_context: int | None = None,
        keep_logits: bool = False,
        guide: JsonGuide | None = None,
    ) -> TokenStream:
        """Stream the ids generated after a prompt whose `<|media_pad|>` runs match the images.

        params: sampling and `max_new_tokens` (default: the checkpoint's). stop_ids: end tokens
        besides `params.stop_token_ids` (default `self.stop_ids`); () runs to max_new_tokens.
        Raises InputError before any work when the prompt does not fit the context (`max_context`
        or the model's). The stream's `stats.decode_s` is wall time, including the consumer's.
        guide: a grammar the sampled tokens must follow once it is active (the caller feeds it
        every yielded id and activates it).
        """
        params = params or self.defaults
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
        grids = torch.zeros(0, 2, dtype=torch.long) if grid_hws is None else grid_hws.reshape(-1, 2).long().cpu()
        kh, kw = self.config.vision.merge_kernel_size
        image_tokens = [(h // kh) * (w // kw) for h, w in grids.tolist()]
        plan = plan_context(
            ids.shape[1] - sum(image_tokens),
            image_tokens,
            params.max_new_tokens,
            self.config.text.max_position_embeddings,
            max_context,
        )
        stats = GenerationStats(prompt_tokens=ids.shape[1], image_tokens=image_tokens)
        stop = frozenset(self.stop_ids if stop_ids is None else stop_ids) | set(params.stop_token_ids)
        return TokenStream(
            lambda stream: self._run(
                stream, ids, pixel_values, grids, params, plan.max_new_tokens, plan.cache_len, stop
            ),
            stats,
            keep_logits,
            plan.max_new_tokens,
            guide,
        )

    @torch.inference_mode()
    def _run(
        self,
        stream: TokenStream,
        ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        grids: torch.Tensor,
        params: SamplingParams,
        max_new: int,
        cache_len: int,
        stop: frozenset[int],
    ) -> Iterator[int]:
        """One request: vision, then prefill, then decode (the stream's `stats` record each)."""
        features = self._vision(pixel_values, grids, stream.stats)
        t1 = time.perf_counter()
        with self._held_graph(cache_len) as graph:
            cache = graph.cache if graph else LatentCache(self.config.text, 1, cache_len, self.dtype, self.device)
            stream.stats.cache_bytes = cache.buf.numel() * cache.buf.element_size()
            logits = self.prefill(ids.to(self.device), features, cache)
            # Prompt + generated ids for the repetition penalty, -1 = not yet: a static shape.
            history = torch.full((1, cache_len), -1, dtype=torch.long, device=self.device)
            history[:, : ids.shape[1]] = ids
            run = _Decoding(params, stop, max_new, cache, graph, make_generator(params.seed, self.device), history)
            _sync(self.device)
            stream.stats.prefill_s = time.perf_counter() - t1
            yield from self._decode_n(stream, run, logits, ids.shape[1])

    def _vision(
        self, pixel_values: torch.Tensor | None, grids: torch.Tensor, stats: GenerationStats
    ) -> torch.Tensor | None:
        """The images' features [F, D] in prompt order (None without images); times the encoder."""
        if not grids.shape[0]:
            return None
        if pixel_values is None:
            raise InputError("image grids given without pixel_values")
        t0 = time.perf_counter()
        per_image, stats.images_encoded = self.image_features(pixel_values, grids)
        features = torch.cat(per_image)
        _sync(self.device)
        stats.vision_s = time.perf_counter() - t0
        return features

    def _decode_n(self, stream: TokenStream, run: _Decoding, logits: torch.Tensor, pos: int) -> Iterator[int]:
        """Yield up to `run.max_new` ids after the prompt's `logits`, the next one written at `pos`."""
        stats = stream.stats
        t0 = time.perf_counter()
        try:
            while stats.generated_tokens < run.max_new:
                step = self._next_tokens(stream, run, logits)
                if step is None:
                    stats.finish_reason = "stop"
                    return
                ids, tokens = step
                run.history[:, pos : pos + len(ids)] = tokens
                stats.generated_tokens += len(ids)
                yield from ids
                if stats.generated_tokens >= run.max_new:
                    break  # the last token needs no forward pass
                logits = self._step(run, tokens, pos)
                pos += tokens.shape[1]
            stats.finish_reason = "length"
        except GeneratorExit:
            stats.finish_reason = "interrupted"
            raise
        finally:
            stats.decode_s = time.perf_counter() - t0

    def _next_tokens(
        self, stream: TokenStream, run: _Decoding, logits: torch.Tensor
    ) -> tuple[list[int], torch.Tensor] | None:
        """The ids to feed next and as tokens [1, T]: the forced ones, else one sampled from `logits`
        [1, V]; None when the sample is a stop token."""
        if stream.forced:
            ids = stream.forced[: stream.left]
            stream.forced = []
            return ids, torch.tensor([ids], dtype=torch.long, device=self.device)
        if stream.guide is not None and stream.guide.active:
            stream.guide.mask_(logits)
        token = sample(logits, run.params, run.generator, run.history)  # [1]
        if stream.logits is not None:
            stream.logits.append(logits[0].clone())  # a graph reuses its buffer
        tid = int(token)  # the one host sync per step: streaming needs the id
        if tid in run.stop:
            return None
        return [tid], token.view(1, 1)

    def _step(self, run: _Decoding, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """tokens [1, T] at `pos` -> fp32 logits [1, V]: one token replays the captured graph where
        there is one; otherwise eager (`decode_step` picks fused, native or plain), attending over
        the filled slots only."""
        if run.graph is not None and tokens.shape[1] == 1:
            return run.graph(tokens, pos)
        return self.decode_step(tokens, pos, run.cache, pos + tokens.shape[1])

    @contextlib.contextmanager
    def _held_graph(self, cache_len: int) -> Iterator[DecodeGraph | None]:
        """`_decode_graph` for the length of one request: released however the request ends."""
        graph = self._decode_graph(cache_len)
        try:
            yield graph
        finally:
            if graph is not None:
                graph.in_use = False

    def _decode_graph(self, cache_len: int) -> DecodeGraph | None:
        """The captured decode step over a cache of at least `cache_len` slots (CUDA only), marked in
        use; None on CPU, or while another unfinished request holds it (that one gets its own cache).
        A request whose bucket differs replaces the kept graph (and frees its cache) first."""
        if not self.cuda_graphs or (self._graph is not None and self._graph.in_use):
            return None
        bucket = cache_bucket(cache_len, self.config.text.max_position_embeddings)
        if self._graph is None or self._graph.cache.capacity != bucket:
            self._graph = None
            cache = LatentCache(self.config.text, 1, bucket, self.dtype, self.device)
            self._graph = DecodeGraph(self.decode_step, cache, attends_by_position=self.fused_decode is not None)
        self._graph.in_use = True
        return self._graph

    # --- chat-level generation ---------------------------------------------------------------

    def prepare_images(self, images: Sequence[Image.Image] | ProcessedImages | None) -> ProcessedImages:
        if isinstance(images, ProcessedImages):
            return images
        return process_images(list(images or []), self.image_config)

    def generate(
        self,
        messages: Sequence[Message],
        images: Sequence[Image.Image] | ProcessedImages | None = None,
        params: SamplingParams | None = None,
        *,
        show_thinking: bool = True,
        max_context: int | None = None,
        json_format: JsonFormat | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[Event]:
        """Chat messages (one image item per image, in order) -> ThinkingDelta* AnswerDelta* Done.

        `params.thinking_budget`: after that many reasoning tokens `◁/think▷` is forced and the
        model goes on with the answer. show_thinking=False drops the
        ThinkingDeltas; their tokens still count in the usage. `json_format`: the answer is
        JSON (valid against its schema), by grammar-constrained sampling; a Thinking model
        reasons first, ended in time to leave room for the JSON. `stop`: strings that end the
        answer (not included; finish_reason 'stop'). Context and schema errors are raised here,
        before anything runs; closing the iterator early stops the generation.
        """
        tokenizer = self._require_tokenizer()
        params = params or self.defaults
        guide = self.grammars.guide(json_format) if json_format is not None else None
        processed = self.prepare_images(images)
        prompt = encode_chat(messages, tokenizer, processed.tokens_per_image)
        stream = self.generate_ids(
            prompt.input_ids, processed.pixel_values, processed.grid_hws, params, max_context=max_context, guide=guide
        )
        budget = ThinkingBudget(
            params.thinking_budget,
            tokenizer.encode(THINK_START, allow_special=False),
            tokenizer.encode(THINK_END, allow_special=False),
        )
        return self._events(stream, tokenizer, budget, ThinkingSplitter(show_thinking), StopText(stop))

    def _events(
        self,
        stream: TokenStream,
        tokenizer: Tokenizer,
        budget: ThinkingBudget,
        splitter: ThinkingSplitter,
        stop_text: StopText,
    ) -> Iterator[Event]:
        decoder = tokenizer.incremental_decoder(skip_special=True)
        guide = stream.guide
        if guide is not None:
            if self.thinking:
                stream.force(budget.start_ids)  # the reasoning goes first, unconstrained
            else:
                guide.start()
        owed = 0  # ids the guide had forced that are still to come
        try:
            for tid in stream:
                if guide is not None and guide.active:
                    guide.accept(tid)
                if forced := budget.feed(tid):
                    stream.force(forced)
                elif guide is not None and owed:
                    owed -= 1
                elif guide is not None:
                    forced = self._guide_step(guide, budget, stream.left)
                    stream.force(forced)
                    owed = len(forced) if guide.active else 0  # an ended reasoning starts the guide
                yield from _until_stop(splitter.feed(decoder.push(tid)), stop_text)
                if stop_text.hit:
                    break
        finally:
            stream.close()
        stats = stream.stats
        if stop_text.hit:
            stats.finish_reason = "stop"
        else:
            yield from _until_stop([*splitter.feed(decoder.flush()), *splitter.flush()], stop_text)
            if tail := stop_text.flush():
                yield AnswerDelta(tail)
        yield Done(
            finish_reason=stats.finish_reason,
            usage=Usage(
                prompt_tokens=stats.prompt_tokens,
                image_tokens=sum(stats.image_tokens),
                thinking_tokens=budget.thinking_tokens,
                answer_tokens=budget.answer_tokens,
            ),
            timings=Timings(
                vision_s=stats.vision_s,
                prefill_s=stats.prefill_s,
                decode_s=stats.decode_s,
                thinking_s=budget.thinking_s,
            ),
            model=self.name,
        )

    @staticmethod
    def _guide_step(guide: JsonGuide, budget: ThinkingBudget, left: int) -> list[int]:
        """Ids to force for a constrained answer: the end of the reasoning when only the JSON's
        room is left, or the JSON's closing when the budget is that tight; usually none."""
        if guide.active:
            return guide.closing(left)
        if budget.in_thinking and left <= guide.window + len(budget.end_ids):
            return budget.end_now()
        if budget.phase is Phase.ANSWER:
            guide.start()
        return []


def _until_stop(deltas: Sequence[Event], stop_text: StopText) -> Iterator[Event]:
    """The deltas with answer text cut at the first stop string (none: unchanged)."""
    for delta in deltas:
        if not isinstance(delta, AnswerDelta) or not stop_text.stops:
            yield delta
        elif text := stop_text.feed(delta.text):
            yield AnswerDelta(text)


TEMPLATE_TOKENS = ("<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>")


def check_agreement(config: KimiVLConfig, tokenizer: Tokenizer, image_config: ImageProcessorConfig) -> None:
    """The checkpoint's files agree with one another. Tokenizer and model on ids: every id the model
    can emit decodes, every special token a prompt uses is an embedding row, the image placeholder
    is the config's (a truncated `tiktoken.model` shifts all special ids and fails here, not in the
    middle of a generation). Image processor and vision tower on patch and merge sizes."""
    vision = config.vision
    if (image_config.patch_size, tuple(image_config.merge_kernel_size)) != (
        vision.patch_size,
        tuple(vision.merge_kernel_size),
    ):
        raise CheckpointError(
            f"preprocessor_config.json (patch {image_config.patch_size}, merge {list(image_config.merge_kernel_size)}) "
            f"disagrees with config.json (patch {vision.patch_size}, merge {list(vision.merge_kernel_size)})",
            "the two files do not belong together",
        )
    vocab = config.text.vocab_size
    if not tokenizer.num_base_tokens < vocab <= tokenizer.vocab_size:
        raise CheckpointError(
            f"tiktoken.model has {tokenizer.num_base_tokens} tokens (+{tokenizer.vocab_size - tokenizer.num_base_tokens}"
            f" special), which does not fit config.json's vocab_size {vocab}",
            "the tokenizer file is truncated or belongs to another model",
        )
    if tokenizer.media_pad_id != config.media_placeholder_token_id:
        raise CheckpointError(
            f"<|media_pad|> is id {tokenizer.media_pad_id} in the tokenizer but "
            f"{config.media_placeholder_token_id} in config.json",
            "the tokenizer and the weights do not belong together",
        )
    for name in (*TEMPLATE_TOKENS, tokenizer.names.eos):
        if tokenizer.token_id(name) >= vocab:
            raise CheckpointError(f"the tokenizer's {name} is outside the model's vocabulary of {vocab}")


def _sync(device: torch.device) -> None:
    """Wait for queued device work, so phase timings are honest (not called inside the decode step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
