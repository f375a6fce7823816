"""`hotswap` command line."""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from server.admin_client import add_admin_commands, run_admin_command
from server.api.limits import DEFAULT_MAX_ADAPTER_BYTES, DEFAULT_MAX_N, DEFAULT_MAX_REQUEST_BYTES, RequestLimits
from server.console import CliError, setup_logging
from server.ray_serve.cli import add_ray_arguments, check_ray_arguments

log = logging.getLogger("hotswap")


def _adapter_arg(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, Path(path)


S2FT_CONVERT_DESCRIPTION = ("Turn a full S2FT fine-tuned checkpoint into a compact S2FT adapter: the rows / columns of "
                            "the linear weights that changed, as a diff against the base model.")


def add_s2ft_convert_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `hotswap convert s2ft` (server.families.s2ft_convert). Defined here, not there,
    because that module imports torch and `hotswap --help` (or a typo) must answer at once."""
    p.add_argument("--base", type=Path, required=True, metavar="DIR", help="base model checkpoint directory (safetensors)")
    p.add_argument("--finetuned", type=Path, required=True, metavar="DIR", help="S2FT fine-tuned checkpoint directory (safetensors)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="adapter directory to write")
    p.add_argument(
        "--atol", type=float, default=0.0,
        help="changes of at most ATOL count as unchanged, and the adapter need only reproduce the fine-tuned "
        "weights within ATOL (default 0: bit-exact)",
    )
    p.add_argument(
        "--delta-dtype", choices=["auto", "float16", "bfloat16", "float32", "float64"], default="auto",
        help="dtype of the stored deltas; auto: the checkpoint's, widened per module to float32/float64 only where "
        "needed to meet --atol (default: auto)",
    )
    p.add_argument("--base-model-name", default=None, help="base_model_name_or_path to record (default: --base as given)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hotswap", description="Multi-tenant LLM server: one base model, many adapters in every batch.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--model", type=Path, default=None, help="Hugging Face Llama-family checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--served-model-name", default=None, help="model id clients use for the base model (default: the directory name)")
    serve.add_argument("--adapter", action="append", type=_adapter_arg, default=[], metavar="NAME=PATH", help="a PEFT LoRA directory to serve as NAME (repeatable)")
    serve.add_argument("--adapters-dir", type=Path, default=None, help="serve every subdirectory holding adapter_config.json, named after it")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default=os.environ.get("HOTSWAP_DEVICE", "auto"), metavar="{auto,cpu,cuda,cuda:N}",
                       help="where the engine runs (auto: the GPU when torch sees one, else the CPU; default $HOTSWAP_DEVICE or auto)")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="compute dtype of activations and adapters (auto: float32 on CPU, bfloat16 on CUDA, float16 on GPUs without bf16)")
    serve.add_argument("--lora-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="storage dtype of the LoRA adapter pools; their GEMMs run in --dtype (auto: bfloat16 on CPU, "
                            "half the memory traffic of many adapters per step; --dtype on CUDA)")
    serve.add_argument("--quantization", choices=["auto", "none", "int8", "int4", "w8a8"], default="auto",
                       help="base weights: int8 per output channel or int4 group-wise, weight-only; w8a8 (CPU): SmoothQuant int8 "
                            "weights x per-token int8 activations (auto: the fastest measured for this device)")
    serve.add_argument("--quant-group-size", type=int, default=32, help="int4: input columns per scale/zero group")
    serve.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    serve.add_argument("--max-num-batched-tokens", type=int, default=2048, help="most tokens per engine step (long prompts are prefilled in chunks)")
    serve.add_argument("--kv-cache-tokens", type=int, default=None, help="KV-cache budget in tokens (default: 32768 on CPU; on CUDA what --gpu-memory-utilization leaves)")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="CUDA: share of the GPU's memory to fill with weights, adapter pools and KV cache")
    serve.add_argument("--enforce-eager", action="store_true", help="run decode steps eagerly: no CUDA graphs on CUDA, no torch.compile on the CPU (start-up is faster, decoding slower)")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    serve.add_argument("--max-model-len", type=int, default=None, help="context length limit (default: the model's, capped by the KV cache)")
    serve.add_argument("--max-lora-rank", type=int, default=64)
    serve.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    serve.add_argument("--prefix-caching", dest="enable_prefix_caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse the KV blocks of a prompt prefix served before (keyed by the adapter's contents, so never across "
                            "adapters, versions or RecLoRA user states); --no-prefix-caching computes every prompt in full")
    serve.add_argument("--scheduling", choices=("fair", "fcfs"), default="fair",
                       help="order of admission: fair = Virtual Token Counter across tenants, weighted by the tenant's `weight` "
                            "(one tenant: first come first served); fcfs = arrival order (default: %(default)s)")
    serve.add_argument("--speculative-config", type=_speculative_config, default=None, metavar="JSON",
                       help='speculative decoding by prompt lookup, as vLLM spells it: \'{"method": "ngram", "num_speculative_tokens": 4, '
                            '"prompt_lookup_max": 4, "prompt_lookup_min": 1, "disable_by_batch_size": 4}\' (keys optional; default: off)')
    serve.add_argument("--admin-key", default=os.environ.get("HOTSWAP_ADMIN_KEY"),
                       help="bearer key required on every API call; prefer the env HOTSWAP_ADMIN_KEY (a flag shows in `ps`). Without one the server listens on loopback only")
    serve.add_argument("--store", default="./var/store", help="adapter registry: a local directory, s3://bucket/prefix, or memory://")
    serve.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL or AWS); credentials from the AWS environment variables")
    serve.add_argument("--cache-dir", type=Path, default=None, help="local disk cache of adapter files (default: $HOTSWAP_HOME/adapter-cache)")
    serve.add_argument("--disk-cache-bytes", type=int, default=20 * 2**30)
    serve.add_argument("--host-adapter-bytes", type=int, default=4 * 2**30, help="host-RAM budget for parsed adapters")
    serve.add_argument("--adapter-memory-bytes", type=int, default=2 * 2**30, help="device budget for adapter row pools")
    serve.add_argument("--max-adapter-bytes", type=int, default=DEFAULT_MAX_ADAPTER_BYTES, help="largest adapter upload accepted (refused while it streams in)")
    serve.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, help="largest request body on every other route (413 before it is read in full)")
    serve.add_argument("--max-n", type=int, default=DEFAULT_MAX_N, help="most choices (`n`) one request may ask for")
    serve.add_argument("--max-prompt-tokens", type=int, default=None, help="most prompt tokens one request may send (default: the context length less one)")
    serve.add_argument("--enable-docs", action="store_true", help="serve /docs and /openapi.json even when an admin key is set (always served without one)")
    serve.add_argument("--drain-seconds", type=float, default=30.0, metavar="S",
                       help="on SIGTERM/SIGINT: refuse new requests (503, Retry-After; /health says draining), let open ones "
                            "run for up to S seconds, end the rest with a final error, exit 0 (0: end them at once; a second signal: now)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    add_ray_arguments(serve)

    add_admin_commands(sub)

    convert = sub.add_parser("convert", help="make a compact adapter from a fine-tuned checkpoint",
                             description="Make a compact adapter from a fine-tuned checkpoint.")
    kinds = convert.add_subparsers(dest="kind", required=True, metavar="KIND")
    add_s2ft_convert_arguments(kinds.add_parser("s2ft", help="an S2FT adapter from a full S2FT fine-tuned checkpoint",
                                                 description=S2FT_CONVERT_DESCRIPTION))

    fetch = sub.add_parser("fetch-model", help="download and convert the embedded default model into the cache")
    fetch.set_defaults(command="fetch-model")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `hotswap` command; returns its exit status. A user-caused error ends it the way argparse's
    usage errors do: one line on stderr, `hotswap: error: <what went wrong and what to do>`, exit 1
    (SystemExit). Anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "info"))
    try:
        return _dispatch(args)
    except KeyboardInterrupt:  # Ctrl-C while the model loads; uvicorn handles it once serving
        return 130
    except (CliError, OSError) as e:  # the admin client turns httpx's errors into CliErrors
        _exit_with(e)
    except ValueError as e:
        # The engine validates the checkpoint and the adapters as it loads them (AdapterError and the
        # loader's errors are ValueErrors); elsewhere a ValueError is a bug.
        if args.command != "serve":
            raise
        _exit_with(e)


def _exit_with(error: Exception) -> NoReturn:
    log.debug("the error below came from here", exc_info=error)  # --log-level debug
    # Our own messages are written as one line; a library's may span several.
    message = str(error) if isinstance(error, CliError) else " ".join(str(error).split()) or type(error).__name__
    raise SystemExit(f"hotswap: error: {message}") from None


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "fetch-model":
        print(_embedded_model_dir())
        return 0
    if args.command == "convert":
        from server.families.s2ft_convert import run_convert  # imports torch: only now

        return run_convert(args)
    if args.command in ("adapters", "tenants", "sglora"):
        return run_admin_command(args)
    return _serve(args)


def _embedded_model_dir() -> Path:
    """The embedded model's directory, fetched and converted on first use (CliError if it cannot be)."""
    from server.models.embedded import ensure_embedded_model

    try:
        return ensure_embedded_model()
    except RuntimeError as e:  # its message says how to fetch the weights by hand
        raise CliError(str(e)) from e


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # as server.lora.peft reads them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _check_serve_inputs(args: argparse.Namespace) -> None:
    """Refuse paths and a store that cannot work in a second, before the model loads for many
    (CliError). The engine still validates the files' contents against the model as it loads them."""
    from adapters_store import open_store
    from adapters_store.errors import RegistryError

    from server.engine.device import DeviceUnavailable, resolve_device  # imports torch: a second, before the model's minutes

    try:
        if not args.ray:  # with --ray the replicas' machines matter, not this one's (server.ray_serve.cli)
            resolve_device(args.device)
    except DeviceUnavailable as e:
        raise CliError(str(e)) from None
    if args.model is not None:
        _check_model_dir(args.model)
    if args.adapters_dir is not None:
        root = args.adapters_dir
        if not root.is_dir():
            state = "is not a directory" if root.exists() else "does not exist"
            raise CliError(f"--adapters-dir {root} {state}: give a directory whose subdirectories are PEFT adapter directories")
        found = [sub for sub in sorted(root.iterdir()) if (sub / ADAPTER_CONFIG).is_file()]
        if not found:
            log.warning("--adapters-dir %s holds no adapter (no subdirectory with %s): serving none from it", root, ADAPTER_CONFIG)
        for sub in found:
            _check_adapter_dir(sub, f"--adapters-dir adapter {sub.name} ({sub})")
    for name, path in args.adapter:
        _check_adapter_dir(path, f"--adapter {name}={path}")
    try:
        open_store(args.store, s3_endpoint=args.s3_endpoint)  # no network; a local store makes its directory
    except RegistryError as e:  # a bad URL, a directory that cannot be created
        raise CliError(f"--store {args.store}: {e}") from e


def _check_adapter_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        state = "is not a directory" if path.exists() else "does not exist"
        raise CliError(f"{what}: {state}; an adapter is a directory holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    if not (path / ADAPTER_CONFIG).is_file():
        raise CliError(f"{what}: no {ADAPTER_CONFIG} in it: is it a PEFT adapter directory (as written by save_pretrained)?")
    if not (path / ADAPTER_WEIGHTS).is_file():
        if (path / "adapter_model.bin").exists():
            # Unpickling runs arbitrary code: the server reads safetensors only.
            raise CliError(f"{what}: holds a pickled adapter_model.bin, which is never loaded: convert it to safetensors "
                           "(e.g. save_pretrained(..., safe_serialization=True))")
        raise CliError(f"{what}: no {ADAPTER_WEIGHTS} in it")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CliError(f"{what}: {ADAPTER_CONFIG} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CliError(f"{what}: {ADAPTER_CONFIG} must hold a JSON object")


def _check_model_dir(path: Path) -> None:
    from server.models.config import ModelConfig  # json only, no torch

    if not path.is_dir():
        state = "is not a directory" if path.exists() else "does not exist"
        raise CliError(f"--model {path} {state}: give a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer)")
    try:
        ModelConfig.from_dir(path)  # FileNotFoundError (an OSError) without config.json
    except KeyError as e:
        raise CliError(f"--model {path}: config.json lacks {e}: is it a Llama-family checkpoint?") from e
    except ValueError as e:  # bad JSON, unsupported model_type
        raise CliError(f"--model {path}: config.json: {e}") from e
    if not any(path.glob("*.safetensors")):
        raise CliError(f"--model {path} holds no *.safetensors weights (pickled .bin checkpoints are never loaded: convert them to safetensors)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CliError(f"--model {path} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])})")


def _speculative_config(text: str):
    from server.engine.speculative import SpeculativeConfig

    try:
        return SpeculativeConfig.from_json(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _serve(args) -> int:
    host_ip = args.host
    try:
        loopback = host_ip == "localhost" or ipaddress.ip_address(host_ip).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not args.admin_key:
        # An open server (no key) must not be reachable from the network.
        print(f"hotswap: error: refusing to bind {host_ip} without an admin key: set HOTSWAP_ADMIN_KEY (or --admin-key), or listen on 127.0.0.1", file=sys.stderr)
        return 2
    if not args.drain_seconds >= 0:  # NaN too
        raise CliError(f"--drain-seconds {args.drain_seconds}: give the seconds open requests may run on after SIGTERM, 0 or more")
    check_ray_arguments(args)
    _check_serve_inputs(args)
    model_dir = args.model if args.model is not None else _embedded_model_dir()  # fetched now: a failure is one clear line

    import time

    import uvicorn

    from server.adapters.service import build_adapter_service
    from server.api.app import build_app
    from server.api.guard import SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE
    from server.engine.client import RequestFailed
    from server.engine.llm_engine import LLMEngine

    config, limits = engine_config(args), request_limits(args)
    if args.ray:  # the engines run in Ray Serve replicas, the HTTP layer in its ingress (server/ray_serve)
        from server.ray_serve.cli import serve_on_ray

        return serve_on_ray(args, config, Path(model_dir).resolve(), limits)
    engine = LLMEngine.on_own_thread(config)  # built where its loop will run: server.engine.engine_thread
    service = build_adapter_service(engine, args.store, args.s3_endpoint, args.cache_dir, args.disk_cache_bytes, args.host_adapter_bytes)
    logging.getLogger("hotswap").info("adapter registry: %s", service.registry.store.description)
    app = build_app(engine, api_key=args.admin_key, adapter_service=service, limits=limits, enable_docs=args.enable_docs)

    admission, client = app.state.admission, app.state.engine
    shutting_down = RequestFailed(SHUTTING_DOWN_MESSAGE, status=503, code=SHUTTING_DOWN)

    class DrainingServer(uvicorn.Server):
        """SIGTERM/SIGINT: /health says `draining` and new API requests get 503 + Retry-After, while the
        server keeps listening; open requests run on until none is left or --drain-seconds have passed;
        then whatever still runs in the engine ends with a final error (an SSE error event, or a 503) and
        the process exits 0. A second signal ends them at once; a third stops waiting for connections."""

        drain_until: float | None = None  # monotonic deadline, from the first signal
        ended = False  # the engine's remaining requests have been failed
        announced = False

        def handle_exit(self, sig, frame) -> None:
            # A signal handler: flags only (no logging: its locks are not reentrant); on_tick does the work.
            # Not passing the signal to uvicorn also keeps it from re-raising it at exit: the status is 0.
            if self.drain_until is None:
                admission.draining = True
                self.drain_until = time.monotonic() + args.drain_seconds
            elif not self.ended:
                self.drain_until = 0.0
            else:
                self.should_exit = self.force_exit = True

        async def on_tick(self, counter: int) -> bool:
            if self.drain_until is not None and not self.ended:
                self._drain()
            return await super().on_tick(counter)

        def _drain(self) -> None:
            if not self.announced:
                self.announced = True
                log.info("draining: new requests get 503; %d open ones have %g s to finish (--drain-seconds)", admission.in_flight, args.drain_seconds)
            if admission.in_flight and time.monotonic() < self.drain_until:
                return
            if admission.in_flight:
                log.warning("draining: ending %d requests still open (%d sequences in the engine)", admission.in_flight, client.sequences_in_flight)
            client.fail_all(shutting_down, refuse_new=True)  # applied between engine steps
            self.ended = self.should_exit = True  # uvicorn stops listening and waits for the streams' final events

    # After the drain, streams need a moment to send their final error; a request stuck outside the
    # engine (an upload, say) is cut off after this.
    DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=FINAL_GRACE_S)).run()
    return 0


def request_limits(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(max_request_bytes=args.max_request_bytes, max_adapter_bytes=args.max_adapter_bytes, max_n=args.max_n,
                         max_prompt_tokens=args.max_prompt_tokens)  # fmt: skip


def engine_config(args: argparse.Namespace):
    """The engine's settings from `hotswap serve`'s flags (one engine in-process, or each Ray Serve replica's)."""
    from server.config import EngineConfig

    return EngineConfig(
        model=args.model, served_model_name=args.served_model_name, device=args.device, dtype=args.dtype,
        lora_dtype=args.lora_dtype, quantization=args.quantization, quant_group_size=args.quant_group_size,
        adapters=dict(args.adapter), adapters_dir=args.adapters_dir,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size, max_model_len=args.max_model_len,
        max_lora_rank=args.max_lora_rank, threads=args.threads, adapter_memory_bytes=args.adapter_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        speculative=args.speculative_config, enable_prefix_caching=args.enable_prefix_caching, scheduling=args.scheduling,
    )


FINAL_GRACE_S = 5  # seconds connections get to finish after the drain ends what still runs


if __name__ == "__main__":
    sys.exit(main())
