"""The synchronous engine: load model and adapters, then step."""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from kernels import cpu_lora
from kernels.dispatch import select_kernels
from kernels.quant import PACKED_MAX_ROWS, Int8Weight
from kernels.w8a8 import INT_MM_FAST, ROWS_INT_MM
from server.config import EngineConfig
from server.engine.block_manager import BlockManager
from server.engine.compiled_decode import CompiledDecode, compile_disabled
from server.engine.decode_graphs import CudaGraphBackend, DecodeGraphs
from server.engine.device import dtype_name, kv_cache_tokens, resolve_device, resolve_dtype, resolve_lora_dtype
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.engine_thread import EngineThread
from server.engine.fairness import waiting_queue
from server.engine.guided import GUIDED_REJECTED, Grammars, GuidedError
from server.engine.model_runner import ModelRunner, StepResult
from server.engine.scheduler import ScheduledSeq, Scheduler
from server.engine.sequence import RequestFailed, Sequence, TokenLogprob
from server.engine.speculative import SpeculativeConfig, Speculator
from server.engine.transfer import transfers_for
from server.errors import AdapterTooLarge
from server.lora.manager import AdapterManager
from server.families.registry import FAMILIES, parse_adapter
from server.lora.peft import read_adapter_files
from server.models.calibration import calibration_ids
from server.models.config import ModelConfig
from server.models.loader import load_model
from server.models.modules import ADAPTER_MODULES, module_dims
from server.models.quantize import describe_kernels, quantize_model, resolve_quantization, weight_bytes

log = logging.getLogger(__name__)

ENGINE_FAILED = "the engine failed while computing this request"


@dataclass(slots=True)
class StepStats:
    num_seqs: int
    num_tokens: int
    num_adapters: int
    seconds: float


@dataclass(slots=True)
class SeqUpdate:
    """What one sequence produced in a step."""

    seq: Sequence
    text: str
    new_token_ids: list[int]
    finished: bool
    logprobs: list[TokenLogprob] | None = None  # the new tokens' (params.logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # in a sequence's first update (params.prompt_logprobs)


def base_fingerprint(model_name: str, model_dir: Path) -> str:
    """What a registry adapter's manifest names as its base model: the served name and its config's hash."""
    return f"{model_name}:{hashlib.sha256((Path(model_dir) / 'config.json').read_bytes()).hexdigest()[:16]}"


class LLMEngine:
    @classmethod
    def on_own_thread(cls, config: EngineConfig) -> "LLMEngine":
        """An engine built on a thread of its own, which its loop then runs on (server.engine.engine_thread
        says why: the server's engine)."""
        thread = EngineThread()
        engine = thread.call(lambda: cls(config))
        engine.thread = thread
        return engine

    def __init__(self, config: EngineConfig):
        self.config = config
        self.thread: EngineThread | None = None  # the thread it was built on, where its loop should run (on_own_thread)
        if config.threads:
            torch.set_num_threads(config.threads)
        model_dir = config.model
        if model_dir is None:
            from server.models.embedded import EMBEDDED_MODEL_NAME, ensure_embedded_model

            model_dir = ensure_embedded_model()
            self.model_name = config.served_model_name or EMBEDDED_MODEL_NAME
        else:
            self.model_name = config.served_model_name or Path(model_dir).name
        self.model_dir = Path(model_dir)
        # adapters are checked against this: same name and same architecture/config
        self.base_fingerprint = base_fingerprint(self.model_name, self.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, self.device)
        self.dtype_name = dtype_name(dtype)
        lora_dtype = resolve_lora_dtype(config.lora_dtype, self.device, dtype)
        self.lora_dtype_name = dtype_name(lora_dtype)
        mcfg = ModelConfig.from_dir(self.model_dir)
        positions = min(config.max_model_len or 10**9, mcfg.max_position_embeddings)
        t0 = time.perf_counter()
        # Loaded on the host, quantized there into the device's kernel layout, then moved.
        self.model = load_model(self.model_dir, dtype, positions)
        self.quantization = resolve_quantization(config.quantization, self.device)
        quantize_model(self.model, self.quantization, config.quant_group_size, device=self.device,
                       calibration_ids=calibration_ids(self.tokenizer) if self.quantization == "w8a8" else None)
        self.model.to(self.device)
        adapter_kernels = select_kernels(self.device, config.kernels)
        self.model.use_kernels(adapter_kernels)
        self.kernels = describe_kernels(self.device, self.quantization, config.quant_group_size, adapter_kernels.name)
        if self.device.type == "cpu" and dtype == torch.float32 and adapter_kernels.name == "torch-cpu":
            # LoRA's segmented op in C++ (kernels.cpu_lora): built now (once per machine, ~20-60 s) or
            # loaded from its cache, so that no request waits for it
            self.kernels["adapters"] += ("; LoRA segments: C++ op (kernels/csrc/lora_cpu.cpp)" if cpu_lora.get() is not None
                                         else "; LoRA segments: ATen (the C++ op could not be built)")
        self.kernels["attention"] = ("Triton paged decode + varlen prefill (kernels.triton.attention)" if adapter_kernels.name == "triton"
                                     else "torch SDPA over the gathered KV blocks (kernels.attention)")
        log.info("loaded %s on %s (%s, %d layers, base %s, %.0f MiB of weights) in %.1f s; kernels: %s", self.model_name, self.device,
                 self.dtype_name, mcfg.num_layers, self.quantization, weight_bytes(self.model) / 2**20,
                 time.perf_counter() - t0, "; ".join(f"{k}: {v}" for k, v in self.kernels.items()))
        self.eos_token_ids = frozenset(
            t for t in (*mcfg.eos_token_ids, self.tokenizer.eos_token_id) if t is not None
        )
        # structured output: grammars over the model's logits width, ending at its stop tokens (server.engine.guided)
        self.grammars = Grammars(self.tokenizer, self.model.config.vocab_size, sorted(self.eos_token_ids))

        self.adapters = AdapterManager(self.model, config.adapter_memory_bytes, device=self.device, lora_dtype=lora_dtype,
                                       transfers=transfers_for(self.device), preallocate=self.device.type == "cuda")
        self.static_adapters: set[str] = set()  # --adapter / --adapters-dir: pinned, usable by every caller
        for name, path in self._adapter_sources().items():
            self.load_adapter(name, path)

        kv_bytes_per_token = 2 * mcfg.num_layers * mcfg.num_kv_heads * mcfg.head_dim * dtype.itemsize
        # activations of the largest step, roughly: the logits and MLP intermediates of every batched token
        reserve = config.max_num_batched_tokens * (mcfg.intermediate_size * 4 + mcfg.hidden_size * 8) * 4
        kv_tokens = kv_cache_tokens(config.kv_cache_tokens, self.device, kv_bytes_per_token, config.gpu_memory_utilization, reserve)
        self.max_model_len = min(positions, kv_tokens)
        num_blocks = kv_tokens // config.block_size
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, self._acquire_adapter, self._release_adapter,
            self.make_speculator(config.speculative), waiting_queue(config.scheduling), self._prefix_identity,
        )
        self.runner = ModelRunner(self.model, self.adapters, num_blocks, config.block_size, self.device, self.eos_token_ids)
        if self.device.type == "cuda":
            self._warm_up_kernels(adapter_kernels)
            if not config.enforce_eager:
                max_blocks = -(-self.max_model_len // config.block_size)
                self.runner.graphs = DecodeGraphs(self.runner, config.max_num_seqs, max_blocks, config.max_lora_rank, CudaGraphBackend(self.device))
        elif self.device.type == "cpu" and not config.enforce_eager:
            if compile_disabled():
                log.info("TORCH_COMPILE_DISABLE=1: decode steps run eagerly")
            else:
                self.runner.graphs = CompiledDecode(self.runner)
                self.runner.graphs.warm_up(self._compile_batch_sizes(config.max_num_seqs))
                log.info("compiled the base model's decode step in %.1f s: %s", self.runner.graphs.compile_seconds,
                         self.runner.graphs.describe())
        log.info(
            "KV cache: %d blocks x %d tokens (%.0f MiB); max model length %d; %d adapters resident (%.1f MiB)",
            num_blocks, config.block_size, self.runner.kv_cache_bytes / 2**20, self.max_model_len,
            len(self.adapters.resident), self.adapters.pool_bytes / 2**20,
        )
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self.last_step: StepStats | None = None

    def make_speculator(self, config: SpeculativeConfig | None) -> Speculator | None:
        """The scheduler's drafter for `config` (None: no speculative decoding). Drafts are verified several
        tokens at a time, so not for families whose step hooks keep per-sequence state token by token
        (a rejected draft would have moved it on)."""
        if config is None:
            return None
        # (nor for guided sequences: their matcher moves one kept token at a time, see server.engine.guided)
        return Speculator(config, lambda seq: seq.params.guided is None
                          and (seq.adapter is None or self.adapters.get(seq.adapter).weights is None))

    @property
    def speculator(self) -> Speculator | None:
        return self.scheduler.speculator

    def _compile_batch_sizes(self, max_seqs: int) -> tuple[int, ...]:
        """One batch size per variant of the compiled decode step (server.engine.compiled_decode): one
        sequence, several, with w8a8 on a CPU with VNNI several from the int8 GEMM's row threshold on, and
        with a quantized base more than the weight-only kernels' PACKED_MAX_ROWS."""
        sizes = {1, min(2, max_seqs)}
        if self.quantization == "w8a8" and INT_MM_FAST and max_seqs >= ROWS_INT_MM:
            sizes.add(ROWS_INT_MM)
        if self.quantization != "none" and max_seqs > PACKED_MAX_ROWS:  # the quantized kernels' large-batch path
            sizes.add(PACKED_MAX_ROWS + 1)
        return tuple(sorted(sizes))

    def _warm_up_kernels(self, kernels) -> None:
        """Triton autotuning at start-up over every bucket the server can meet, never inside a step."""
        if kernels.name != "triton":
            return
        from kernels.triton.autotune import warmup

        cfg, dtype = self.model.config, self.model.dtype
        pairs = sorted({module_dims(cfg, m) for m in ADAPTER_MODULES})
        keys = warmup(self.device, dtype, pairs, self.config.max_lora_rank, self.config.max_num_batched_tokens,
                      mlp_sizes=[cfg.intermediate_size], max_s2ft_entries=max(cfg.intermediate_size, cfg.hidden_size))
        int8 = [lin.quant for layer in self.model.layers for lin in layer.linears() if isinstance(lin.quant, Int8Weight)]
        if int8:
            from kernels.triton.quant import warmup as warmup_int8

            head = [self.model.lm_head_quant] if isinstance(self.model.lm_head_quant, Int8Weight) else []
            warmup_int8(int8 + head, dtype, self.config.max_num_batched_tokens)
        log.info("Triton kernels tuned for %d adapter shapes", keys)

    def _adapter_sources(self) -> dict[str, Path]:
        sources: dict[str, Path] = {}
        if self.config.adapters_dir is not None:
            for sub in sorted(Path(self.config.adapters_dir).iterdir()):
                if (sub / "adapter_config.json").is_file():
                    sources[sub.name] = sub
        sources.update(self.config.adapters)
        return sources

    def load_adapter(self, name: str, path: Path) -> None:
        """A static adapter from a local directory: pinned in the device pools for the server's life."""
        weights = self.parse_adapter(read_adapter_files(Path(path), name), name)
        if FAMILIES[weights.family].per_user:
            raise ValueError(f"{name}: {weights.family} adapters are per user: serve them from the registry, not --adapter")
        self.adapters.add(weights, pinned=True)
        self.static_adapters.add(name)
        log.info("adapter %s (%s): %d units, %d modules, %.1f MiB", name, weights.family, weights.units, len(weights.modules), weights.num_bytes / 2**20)

    def parse_adapter(self, files: dict[str, bytes], name: str, family: str | None = None):
        """An adapter's files as its family parses them for this model (AdapterError if they do not fit it).
        Reads the base weights only; safe off the engine thread."""
        return parse_adapter(files, name, self.model.config, self.model.dtype, self.config.max_lora_rank, family, self.model.base_weight)

    def _acquire_adapter(self, seq: Sequence) -> bool:
        """Place the sequence's adapter (False: not now). An adapter that can never be placed fails
        the requests that use it, never the step (RequestFailed)."""
        if seq.adapter is None:
            return True
        if self.adapters.get(seq.adapter) is not None:
            if not self.adapters.ready(seq.adapter):
                return False  # its copy to the device is still in flight: the other requests go on
            self.adapters.touch(seq.adapter)
        elif seq.adapter_weights is None:
            raise RequestFailed("the adapter was unloaded before this request could use it: retry")
        else:
            try:
                placed = self.adapters.ensure_resident(seq.adapter_weights)
            except AdapterTooLarge as e:  # the request's own doing, as permanent as a too-long prompt
                log.warning("%s", e)
                raise RequestFailed(f"the adapter needs more than this server's whole adapter memory ({e.budget} bytes)",
                                    status=400, code="adapter_too_large") from None  # fmt: skip
            except Exception:
                log.exception("adapter %s cannot be placed in the device pools", seq.adapter)
                raise RequestFailed("the adapter cannot be placed on the device: its weights are malformed") from None
            if placed is None:
                return False
        self.adapters.acquire(seq.adapter)
        return True

    def _prefix_identity(self, seq: Sequence) -> str | None:
        """What computes seq's KV, and for whom, for the prefix cache; None where blocks must not be shared:
        families with step hooks (routed experts) keep per-sequence state built token by token (MoLE's
        running sums), which a prefix taken from the cache would skip. Blocks are shared within a tenant
        only: a cache shared across tenants would let one learn from its time to first token whether
        another sent a prompt (the base model and public adapters are used by several)."""
        if seq.adapter is None:
            identity = ""
        elif not seq.prefix_identity:  # unnamed (engine-level callers): an adapter key may come back with other weights
            return None
        else:
            entry = self.adapters.get(seq.adapter)
            family = entry.family if entry is not None else getattr(seq.adapter_weights, "family", None)
            if family is None or FAMILIES[family].step_hooks is not None:
                return None
            identity = seq.prefix_identity
        return identity if seq.tenant is None else f"tenant={seq.tenant}|{identity}"

    def _release_adapter(self, seq: Sequence) -> None:
        """The sequence leaves the running batch (finished, aborted or preempted): its adapter is one user
        lighter and its family state (e.g. MoLE's running sums) goes; a preempted one starts afresh."""
        self.adapters.release(seq.adapter)
        self.runner.release_state(seq)

    # -- requests ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self._detok[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, seq.params.stop)
        if seq.params.guided is not None and seq.guided is None and not self._start_grammar(seq):
            return
        self.scheduler.add(seq)

    def _start_grammar(self, seq: Sequence) -> bool:
        """Give a guided sequence its matcher (compiling its spec here only if nobody did: the API and Ray
        replicas compile on worker threads first). False: it failed alone, reported by the next step."""
        try:
            if seq.grammar is None:
                seq.grammar = self.grammars.compile(seq.params.guided)
            seq.guided = self.grammars.start(seq.grammar)
            return True
        except GuidedError as e:
            seq.fail(RequestFailed(str(e), status=400, code="invalid_structured_output"))
        except Exception:
            log.exception("sequence %d: cannot start its grammar", seq.seq_id)
            seq.fail(RequestFailed("structured output could not start for this request"))
        self.scheduler.failed.append(seq)
        return False

    def abort(self, seq: Sequence) -> None:
        self.scheduler.abort(seq)
        self._forget(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.scheduler.failed)

    def _forget(self, seq: Sequence) -> None:
        self._detok.pop(seq.seq_id, None)

    def step(self) -> list[SeqUpdate]:
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return [self._failed(seq) for seq in self.scheduler.take_failed()]
        self.runner.zero_blocks(self.block_manager.take_fresh())
        result = self._run(scheduled)
        self._advance_grammars(scheduled, result)
        for i, why in result.failures.items():
            scheduled[i].seq.fail(RequestFailed(why))
        for i, logprobs in result.prompt_logprobs.items():
            if i not in result.failures:
                scheduled[i].seq.prompt_logprobs += logprobs
        before = [len(item.seq.output_token_ids) for item in scheduled]
        kept = self.scheduler.postprocess(scheduled, result.tokens, self.eos_token_ids, self._stop_string)
        # Sequences refused at admission are taken only now: had the step raised, they would still be
        # in the scheduler for AsyncEngine._fail_all to answer.
        updates = [self._failed(seq) for seq in self.scheduler.take_failed()]
        for i, item in enumerate(scheduled):
            seq = item.seq
            if i in result.failures:
                updates.append(self._failed(seq))
                continue
            if not kept[i]:
                continue
            new = seq.output_token_ids[before[i]:]
            update = SeqUpdate(seq, self._detok[seq.seq_id].take(seq.is_finished), new, seq.is_finished)
            if seq.params.logprobs is not None:
                seq.output_logprobs += result.logprobs[i][: kept[i]]
                update.logprobs = seq.output_logprobs[before[i]:]
            if seq.params.prompt_logprobs is not None and before[i] == 0:
                update.prompt_logprobs = seq.prompt_logprobs
            updates.append(update)
            if seq.is_finished:
                self._forget(seq)
        self.scheduler.release_finished()
        self.last_step = StepStats(len(scheduled), sum(s.num_new_tokens for s in scheduled), result.num_adapters, time.perf_counter() - t0)
        return updates

    def _stop_string(self, seq: Sequence, token: int) -> bool:
        """Detokenize a kept token; True when a stop string ended the text (EOS and stop tokens are not text),
        or when its grammar has ended (a guided sequence with ignore_eos: nothing may follow)."""
        return self._detok[seq.seq_id].add(token) or (seq.guided is not None and seq.guided.terminated)

    @staticmethod
    def _advance_grammars(scheduled: list[ScheduledSeq], result: StepResult) -> None:
        """Move each guided sequence's matcher on by the token it sampled (once per step, after the step's
        one-at-a-time retry if any). The mask makes a rejection impossible unless something broke: then that
        sequence fails alone."""
        for i, item in enumerate(scheduled):
            state = item.seq.guided
            if state is None or i in result.failures:
                continue
            for token in result.tokens[i]:  # one token: guided sequences get no drafts
                if not state.accept(token):
                    result.failures[i], result.tokens[i] = GUIDED_REJECTED, []
                    break

    def _failed(self, seq: Sequence) -> SeqUpdate:
        self._forget(seq)
        return SeqUpdate(seq, "", [], True)

    def _run(self, scheduled: list[ScheduledSeq]) -> StepResult:
        """Run the step; if the batch raises, run its sequences one at a time so that only those that fail
        alone fail (the KV slots a failed attempt wrote are simply written again)."""
        try:
            return self.runner.run(scheduled)
        except Exception:
            log.exception("a step of %d sequences failed; running them one at a time to find which", len(scheduled))
        tokens: list[list[int]] = []
        logprobs: list[list[TokenLogprob]] = []
        prompt_logprobs: dict[int, list[TokenLogprob]] = {}
        failures: dict[int, str] = {}
        for i, item in enumerate(scheduled):
            try:
                alone = self.runner.run([item])
            except Exception:
                log.exception("sequence %d (adapter %s) fails on its own", item.seq.seq_id, item.seq.adapter)
                alone = StepResult([[]], {0: ENGINE_FAILED}, 0, [[]])
            tokens.append(alone.tokens[0])
            logprobs.append(alone.logprobs[0])
            if 0 in alone.prompt_logprobs:
                prompt_logprobs[i] = alone.prompt_logprobs[0]
            if alone.failures:
                failures[i] = alone.failures[0]
        return StepResult(tokens, failures, len({item.seq.adapter for item in scheduled} - {None}), logprobs, prompt_logprobs)
