"""Serve a DeepSeek-V3-style checkpoint: `--prompt TEXT` streams one generation to stdout,
`--port N` runs the OpenAI-compatible HTTP API (dsv3_jax/serve/http.py).

    python serve.py --checkpoint runs/default --prompt "def main("
    python serve.py --checkpoint DIR --prompt-ids 1,2,3        # a checkpoint without tokenizer
    python serve.py --checkpoint runs/default --port 8000      # then: curl localhost:8000/health
"""

import argparse
import os
import sys
import time

from dsv3_jax.serve.buckets import DEFAULT_PREFILL_CHUNK

# JAX's own variable, where set, else ours
DEFAULT_COMPILATION_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR", "~/.cache/dsv3-jax/xla")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="a train.py run folder or a Hugging Face checkpoint folder")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="generate from this text (needs the checkpoint's tokenizer)")
    what.add_argument("--prompt-ids", help="generate from these comma-separated token ids")
    what.add_argument("--port", type=int, help="serve HTTP on this port (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="tokens to generate (the HTTP default when a request omits max_tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (also the HTTP default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed for --prompt")
    p.add_argument("--stop", action="append", default=[], help="stop string for --prompt (repeatable)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + generation length per request (default: the model's context, "
                        "at most 4096)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before HTTP 429")
    p.add_argument("--max-concurrency", type=int, default=512,
                   help="HTTP requests answered at once before HTTP 503")
    p.add_argument("--generation-timeout", type=float, default=600.0,
                   help="seconds one HTTP request may generate before it is cancelled (504)")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM, how long running requests may finish before they are cancelled")
    p.add_argument("--mesh", default="", help='device mesh, e.g. "expert=4,tensor=2"')
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="compute dtype")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp8"), default=None,
                   help="overrides --dtype; fp8 keeps an FP8 checkpoint's weights as stored")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help="prefill long prompts N tokens per scheduler step, decoding the other "
                        f"requests in between (default {DEFAULT_PREFILL_CHUNK}; 0: whole prompts "
                        "at once, stalling the running streams while a prompt is prefilled)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt in full (default: reuse the cached rows of a "
                        "previous prompt's shared prefix)")
    p.add_argument("--no-precompile", action="store_true",
                   help="compile the engine's programs lazily, on first use, instead of every prefill "
                        "and decode bucket before serving (--port)")
    p.add_argument("--compilation-cache", default=DEFAULT_COMPILATION_CACHE, metavar="DIR",
                   help="JAX's persistent compilation cache: a restart loads the compiled programs, "
                        "including those compiled on first use (prefills after a reused prefix); "
                        f"default {DEFAULT_COMPILATION_CACHE}, '' turns it off")
    p.add_argument("--no-speculative", action="store_true",
                   help="no MTP speculative decoding (default: on when the model has an MTP layer)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    from dsv3_jax.host_memory import keep_freed_memory
    keep_freed_memory()  # before JAX starts: XLA:CPU's temporaries reused, not page-faulted
    if args.prompt is None and args.prompt_ids is None and args.port is None:
        sys.exit("error: give --prompt, --prompt-ids or --port")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.compilation_cache:
        from dsv3_jax.serve.loading import use_compilation_cache
        use_compilation_cache(args.compilation_cache)
    from dsv3_jax.serve.chat import TextStream, stream_text
    from dsv3_jax.serve.engine import Engine, RequestError, SamplingParams
    from dsv3_jax.serve.api import OpenAIAPI
    from dsv3_jax.serve.http import Limits, serve_http
    from dsv3_jax.serve.loading import load_for_serving

    t0 = time.perf_counter()
    mesh = None
    if args.mesh:
        from sharding import make_mesh
        mesh = make_mesh(args.mesh)
    model, tokenizer, template, name = load_for_serving(args.checkpoint, dtype=args.dtype, mesh=mesh,
                                                        precision=args.precision)
    cfg = model.cfg
    max_seq_len = args.max_seq_len or min(cfg.max_position_embeddings, 4096)
    engine = Engine(model, max_seq_len=max_seq_len, max_batch=args.max_batch, mesh=mesh,
                    speculative=False if args.no_speculative else None, max_queue=args.max_queue,
                    detokenize=tokenizer.decode if tokenizer is not None else None,
                    prefill_chunk=args.prefill_chunk or None, prefix_cache=not args.no_prefix_cache)
    log(f"loaded {name}: {cfg.num_params() / 1e6:.1f}M parameters in {time.perf_counter() - t0:.1f}s; "
        f"max_seq_len {max_seq_len}, max_batch {args.max_batch}, speculative {engine.speculative}, "
        f"prefill chunk {args.prefill_chunk or 'whole prompts'}, prefix cache {not args.no_prefix_cache}, "
        f"tokenizer {'yes' if tokenizer else 'none'}, chat template {'yes' if template else 'fallback'}")
    defaults = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.port is not None:
        t0 = time.perf_counter()
        if args.no_precompile:
            for _ in range(2):  # compile one prefill and decode before serving (the second call:
                engine.generate([[0]], max_new_tokens=2)  # the cache as its jitted steps return it)
            log(f"warmed up in {time.perf_counter() - t0:.1f}s (other buckets compile on first use)")
        else:
            n = engine.precompile()
            log(f"compiled {n} prefill and decode programs in {time.perf_counter() - t0:.1f}s")
        engine.start()
        try:
            serve_http(OpenAIAPI(engine, tokenizer=tokenizer, chat_template=template, model_name=name,
                                 defaults=defaults), args.host, args.port, log=log,
                       limits=Limits(max_concurrency=args.max_concurrency,
                                     generation_timeout=args.generation_timeout,
                                     drain_seconds=args.drain_seconds))
        finally:
            engine.shutdown()
        return

    if args.prompt is not None:
        if tokenizer is None:
            sys.exit(f"error: {args.checkpoint} has no tokenizer.json: use --prompt-ids")
        prompt = tokenizer.encode(args.prompt).ids
    else:
        try:
            prompt = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            sys.exit(f"error: --prompt-ids {args.prompt_ids!r} is not a comma-separated list of integers")
    if not 0 < len(prompt) < max_seq_len:
        sys.exit(f"error: the prompt has {len(prompt)} tokens; it must have 1 to {max_seq_len - 1} "
                 f"(--max-seq-len {max_seq_len})")
    eos = cfg.eos_token_id
    eos = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
    params = SamplingParams(**{**defaults.__dict__, "stop_token_ids": eos, "stop": tuple(args.stop),
                               "max_new_tokens": min(args.max_new_tokens, max_seq_len - len(prompt))})
    engine.start()
    t0 = time.perf_counter()
    try:
        request = engine.submit(prompt, params)
    except RequestError as e:
        sys.exit(f"error: {e}")
    text = TextStream(tokenizer.decode if tokenizer else None, params.stop, eos)
    first = True
    for ids, piece in stream_text(request, text):  # text, or ids "5,17,42" without a tokenizer
        sys.stdout.write(piece if tokenizer else "," * (not first and bool(ids)) + ",".join(map(str, ids)))
        sys.stdout.flush()
        first = first and not ids
    print()
    dt = time.perf_counter() - t0
    stats = engine.stats()
    engine.shutdown()
    log(f"{len(request.tokens)} tokens in {dt:.2f}s ({request.finish_reason}; first step includes "
        f"compilation); speculative acceptance {stats['acceptance_rate']:.2f}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, NotImplementedError) as e:  # bad flags, paths, checkpoints
        sys.exit(f"error: {e}")
