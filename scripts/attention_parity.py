"""cuDNN flash attention vs XLA attention through OUR module (`wavlink_jax.models.layers.Attention`), bf16.

    python scripts/attention_parity.py             # on a GPU: exit status 1 if cuDNN and XLA disagree
                                                   # (without cuDNN, e.g. on a CPU: one error line, status 1)
    python scripts/attention_parity.py --json      # one JSON object (what gpu_check.sh logs)

For each case the same `Attention` parameters run with `implementation="cudnn"` and `"xla"`; the outputs, the
input gradient and the parameter gradients of `sum(out · g)` (g random, rows past a caption's length
masked out, as pooling never reads them) are compared by relative error ‖cudnn − xla‖ / ‖xla‖. The cases
are the shapes the benchmark trains:

* Whisper 30 s self-attention: 1500 frames + the global token = 1501 positions (odd: `Attention` pads to
  1504 for cuDNN and masks the padded keys), base (8 heads) and large-v3 (20 heads), head size 64;
* CLIP text: 77 positions (odd, padded to 80), causal, captions of different lengths (`kv_lengths`).

On a GPU the check also requires cuDNN fused-attention custom calls (`__cudnn$fmha…`) in each lowered cuDNN
program, so a silent fall-back to XLA cannot pass; a case that raises (e.g. an unsupported shape) fails. bf16
rounding gives relative errors of a few 1e-3; the bound is 2e-2.

`--unpadded-probe B` asks another question, in a call of its own (a refusal, or a crash, cannot touch the check's
verdict): does this jax and cuDNN train attention at Whisper's odd length as it is, without `Attention`'s pad and
padding mask, and how long does a forward and backward take in each form (small's attention, batch B)? Then it
checks `Attention`'s "cudnn_unpadded" form (odd lengths as they are where jax trains them so, else padded) against
XLA on the cases above, each case saying which form ran; its exit status is that check's, whatever the probe's
answer, and `gpu_check.sh` benchmarks that form only when it is 0 and a case ran unpadded. Why it is asked: in
padding mode cuDNN zeroes its output and gradient buffers before each call (BENCHMARKS.md, "cuDNN's padding mode"),
and jax 0.10.2 refuses any odd length for training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wavlink_jax.models import layers  # noqa: E402

# name → (width, heads, length, causal, key_bias, valid lengths per row or None = all)
CASES = {
    "whisper-base-30s": (512, 8, 1501, False, False, None),
    "whisper-large-v3-30s": (1280, 20, 1501, False, False, None),
    "clip-text-b32-causal-padded": (512, 8, 77, True, True, (77, 20, 9, 50)),
}
TOLERANCE = 2e-2
# `unpadded_probe`'s attention: small's heads (12 of 64) over Whisper's 1500 frames + the global token.
PROBE_HEADS, PROBE_LENGTH = 12, 1501


def relative_error(candidate, reference) -> float:
    a = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(candidate)])
    b = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(reference)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def compare(case: str, batch: int, candidate: str, reference: str = "xla") -> dict:
    """Output, input-gradient and parameter-gradient relative errors of `candidate` vs `reference` on `case`."""
    width, heads, length, causal, key_bias, lengths = CASES[case]
    attention = layers.Attention(
        width, heads, key_bias=key_bias, dtype=jnp.bfloat16, param_dtype=jnp.float32,
        implementation=reference, rngs=nnx.Rngs(0),
    )
    graphdef, params = nnx.split(attention)
    kx, kg = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (batch, length, width), jnp.bfloat16)
    g = jax.random.normal(kg, (batch, length, width), jnp.float32)
    kv_lengths = None if lengths is None else jnp.asarray((lengths * batch)[:batch], jnp.int32)
    valid = jnp.ones((batch, length, 1)) if kv_lengths is None else (
        jnp.arange(length)[None, :, None] < kv_lengths[:, None, None]
    ).astype(jnp.float32)

    def loss(params, x, g, valid, kv_lengths, implementation):
        module = nnx.merge(graphdef, params)
        module.implementation = implementation
        out = module(x, kv_lengths=kv_lengths, causal=causal).astype(jnp.float32) * valid
        return jnp.sum(out * g), out

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=5)
    inputs = (params, x, g, valid, kv_lengths)
    results, cudnn_calls, padded = {}, None, None
    for implementation in (reference, candidate):
        lowered = grad_fn.lower(*inputs, implementation)
        if implementation in layers.CUDNN_IMPLEMENTATIONS:
            cudnn_calls = lowered.as_text().count("__cudnn$fmha")
            module = nnx.merge(graphdef, params)
            module.implementation = implementation
            padded = module.pads(length, causal=causal, lengths=kv_lengths is not None)
        (_, out), (param_grads, x_grad) = lowered.compile()(*inputs)
        results[implementation] = (out, x_grad, param_grads)
    errors = [relative_error(c, r) for c, r in zip(results[candidate], results[reference])]
    return {
        "case": case, "batch": batch, "length": length, "heads": heads, "causal": causal,
        "out": errors[0], "d_input": errors[1], "d_params": errors[2], "cudnn_custom_calls": cudnn_calls,
        "padded": padded,
    }


def unpadded_probe(batch: int, repeats: int = 10) -> dict:
    """cuDNN attention's forward and backward at `PROBE_LENGTH` (odd) in two forms: padded to a multiple of 16
    with the padded keys masked (what `Attention` runs), and as it is, without a mask. Whether the unpadded
    form is accepted (else the error), each form's mean time over `repeats` calls, and the relative error
    between their outputs and gradients (the padded rows cut off)."""
    keys = jax.random.split(jax.random.key(2), 4)
    q, k, v, g = (jax.random.normal(key, (batch, PROBE_LENGTH, PROBE_HEADS, 64), jnp.bfloat16) for key in keys)

    def loss(q, k, v, padded: bool):
        lengths, q, k, v = layers._pad_for_cudnn(None, q, k, v) if padded else (None, q, k, v)  # as `Attention`
        out = jax.nn.dot_product_attention(
            q, k, v, key_value_seq_lengths=lengths, implementation="cudnn"
        )[:, :PROBE_LENGTH]
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32)), out

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    result: dict = {"batch": batch, "length": PROBE_LENGTH, "heads": PROBE_HEADS}
    outputs = {}
    for padded in (True, False):
        form = "padded" if padded else "unpadded"
        try:
            jax.block_until_ready(step(q, k, v, padded))  # compiled and run once before timing
            start = time.perf_counter()
            for _ in range(repeats):
                outputs[form] = step(q, k, v, padded)
            jax.block_until_ready(outputs[form])
        except Exception as error:  # noqa: BLE001 - the answer to the question, not a failure of the check
            result[f"{form}_error"] = repr(error)[:500]
            continue
        result[f"{form}_ms"] = round(1e3 * (time.perf_counter() - start) / repeats, 3)
    result["accepted"] = "unpadded" in outputs
    if len(outputs) == 2:
        grads, out = outputs["unpadded"]
        result["relative_error"] = relative_error((out, grads), (outputs["padded"][1], outputs["padded"][0]))
    return result


def cudnn_unavailable() -> str | None:
    """Why `jax.nn.dot_product_attention(implementation="cudnn")` cannot run here (e.g. no GPU), or None."""
    q = jnp.zeros((1, 16, 1, 64), jnp.bfloat16)
    try:
        jax.block_until_ready(jax.nn.dot_product_attention(q, q, q, implementation="cudnn"))
    except Exception as error:  # noqa: BLE001 - whatever it is, the comparison cannot run
        return str(error) or repr(error)
    return None


def probe_line(probe: dict) -> str:
    """`unpadded_probe`'s answer in one line."""
    where = f"unpadded probe (batch {probe['batch']}, {probe['length']} positions, {probe['heads']} heads, fwd+bwd)"
    if "padded_error" in probe:
        return f"{where}: the padded form itself failed with {probe['padded_error']}"
    if not probe["accepted"]:
        return f"{where}: refused ({probe['unpadded_error']}); padded {probe['padded_ms']:.3f} ms"
    return (f"{where}: accepted, {probe['unpadded_ms']:.3f} ms against {probe['padded_ms']:.3f} ms padded "
            f"({probe['unpadded_ms'] / probe['padded_ms']:.3f}×), relative error {probe['relative_error']:.2e}")


def check(cases: list[str], batch: int, candidate: str) -> dict:
    """`compare` on every case: the summary, with `ok` when each case ran, agreed within TOLERANCE and, on a GPU,
    called cuDNN for a cuDNN candidate."""
    rows = []
    for case in cases:
        try:
            rows.append(compare(case, batch, candidate))
        except Exception as error:  # noqa: BLE001 - reported per case; the check fails
            rows.append({"case": case, "error": repr(error)[:1000]})
    measured = [r for r in rows if "error" not in r]
    errors = [r[key] for r in measured for key in ("out", "d_input", "d_params")]
    # NaN where any is (Python's max passes over a NaN that does not come first: a NaN gradient passed the check).
    worst = max(errors, default=math.inf) if all(map(math.isfinite, errors)) else math.nan
    # Only a GPU build has the cuDNN custom call; elsewhere (the CPU test) the cuDNN path is simulated.
    on_gpu = jax.default_backend() == "gpu"
    cudnn = candidate in layers.CUDNN_IMPLEMENTATIONS
    missing_kernel = on_gpu and cudnn and any(not r["cudnn_custom_calls"] for r in measured)
    ok = len(measured) == len(rows) and worst < TOLERANCE and not missing_kernel
    return {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "candidate": candidate, "batch": batch,
            "tolerance": TOLERANCE, "worst": worst, "missing_kernel": missing_kernel, "ok": ok, "cases": rows}


def check_lines(summary: dict) -> list[str]:
    """`check`'s summary as the report's lines."""
    lines = [
        f"jax {summary['jax']} on {summary['device']}: {summary['candidate']} vs xla, bf16, batch {summary['batch']}"
    ]
    for r in summary["cases"]:
        if "error" in r:
            lines.append(f"  {r['case']}: FAILED with {r['error']}")
            continue
        form = "" if r["padded"] is None else (", padded for cuDNN" if r["padded"] else ", unpadded")
        lines.append(
            f"  {r['case']} (length {r['length']}, {r['heads']} heads{', causal' if r['causal'] else ''}{form}): "
            f"relative error out {r['out']:.2e}, d_input {r['d_input']:.2e}, d_params {r['d_params']:.2e}, "
            f"cuDNN fused-attention calls {r['cudnn_custom_calls']}"
        )
    verdict = "OK" if summary["ok"] else (
        "FAILED: no cuDNN kernel in the program" if summary["missing_kernel"] else "FAILED"
    )
    lines.append(f"attention parity {verdict} (worst {summary['worst']:.2e}, bound {TOLERANCE:g})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--candidate", choices=(*layers.CUDNN_IMPLEMENTATIONS, "xla"),
        help="implementation under test (default cudnn; with --unpadded-probe, cudnn_unpadded)",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--unpadded-probe", type=int, default=0, metavar="B",
        help="first time cuDNN attention at Whisper's odd length unpadded and unmasked against padded, at batch B; "
        "then check Attention's cudnn_unpadded form against XLA (status 0 when it agrees, whatever the probe's "
        "answer)",
    )
    args = parser.parse_args(argv)
    if args.unpadded_probe and args.candidate not in (None, "cudnn_unpadded"):
        parser.error("--unpadded-probe checks the cudnn_unpadded form: no other --candidate")
    candidate = args.candidate or ("cudnn_unpadded" if args.unpadded_probe else "cudnn")

    why = cudnn_unavailable() if candidate in layers.CUDNN_IMPLEMENTATIONS else None
    if why:
        print(f"error: attention_parity.py needs a GPU with cuDNN (jax backend: {jax.default_backend()}): {why}",
              file=sys.stderr)
        return 1
    probe = unpadded_probe(args.unpadded_probe) if args.unpadded_probe else None
    summary = check(args.cases, args.batch, candidate)
    if args.json:
        print(json.dumps(summary if probe is None else {"unpadded_probe": probe, **summary}))
    else:
        print("\n".join(([] if probe is None else [probe_line(probe)]) + check_lines(summary)))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
