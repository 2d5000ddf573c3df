"""scripts/benchmark.py runs end to end on a CPU (tiny shapes) and reports every figure; the FLOP count is right.

The benchmark runs as a subprocess, as a user runs it, with one host device (the conftest's 8 would put the
single-device benchmark on a different XLA client set-up than a real run).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402
import hlo_traffic  # noqa: E402
from test_hlo_traffic import WITH_FRAMES, WITHOUT_FRAMES  # noqa: E402  (a module with stack frame tables)

POSITIVE_FIELDS = (
    "compile_s", "step_time_s", "samples_per_s", "flops_per_step_model", "flops_per_step_cost_analysis",
    "tflops_model", "tflops_cost_analysis", "matmul_peak_tflops", "fraction_of_peak_model",
    "fraction_of_peak_cost_analysis",
)


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    """One tiny run, ours (profiled for a step, its HLO dumped, compiled with two XLA options) and the
    eager PyTorch baseline, fp32 (CPUs have no fast bf16), batch 8. The dump's and the saved trace's paths are
    added as `dumped_hlo`, `saved_trace`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    dump = tmp_path_factory.mktemp("hlo") / "step.txt.gz"
    trace = dump.with_name("trace.json.gz")
    command = [
        sys.executable, str(ROOT / "scripts" / "benchmark.py"),
        "--tiny", "--steps", "2", "--json", "--dtype", "float32", "--batch", "8", "--baseline", "torch",
        "--profile", "1", "--dump-hlo", str(dump), "--save-trace", str(trace),
        "--xla-option", "xla_gpu_enable_command_buffer=", "--xla-option", "xla_gpu_enable_triton_gemm=False",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "dumped_hlo": str(dump), "saved_trace": str(trace)}


def test_a_gz_dump_is_what_hlo_traffic_reads(result):
    """--dump-hlo x.txt.gz (the README's name) was written as plain text, which hlo_traffic refused."""
    launches = hlo_traffic.launches(hlo_traffic.read_hlo(Path(result["dumped_hlo"])))
    assert launches


def test_the_saved_trace_is_the_one_summarised(result):
    """--save-trace keeps the profiler's trace, which gives the same summary as the run's, and in which the train
    step ran (a CPU trace has no device lines, so its summary alone would match any trace)."""
    summary = benchmark.summarize_trace(Path(result["saved_trace"]), steps=1)
    assert summary["device_busy_ms_per_step"] == result["profile"]["device_busy_ms_per_step"]
    assert summary["lines"] == result["profile"]["lines"]
    with gzip.open(result["saved_trace"]) as file:
        events = json.load(file)["traceEvents"]
    assert any(event.get("name") == "PjitFunction(jit(step))" for event in events)


def check_positive(result: dict, fields) -> None:
    for field in fields:
        assert isinstance(result[field], (int, float)) and result[field] > 0, (field, result[field])


def test_tiny_benchmark_reports_every_figure(result):
    check_positive(result, POSITIVE_FIELDS)
    assert result["platform"] == "cpu" and result["peak_memory_bytes"] is None
    memory = result["program_memory"]  # the compiler's figure, which a CPU has (the allocator's peak it lacks)
    assert memory["program_bytes"] == (
        memory["argument_bytes"] + memory["temporary_bytes"] + memory["output_bytes"] - memory["aliased_bytes"]
    ) > 0
    assert 0 < memory["aliased_bytes"] <= memory["output_bytes"]  # the donated state is updated in place
    assert result["batch"] == 8 and result["frames"] == 100 and result["attention"] == "xla"
    # compile options a GPU's XLA reads, which a CPU's accepts; true/false (any case) a flag's value
    assert result["xla_options"] == {"xla_gpu_enable_command_buffer": "", "xla_gpu_enable_triton_gemm": False}
    assert (", remat none, XLA options xla_gpu_enable_command_buffer='', xla_gpu_enable_triton_gemm=False on cpu "
            "(cpu), ") in benchmark.report(result)
    baseline = result["baseline"]
    check_positive(baseline, ("step_time_s", "samples_per_s", "tflops_model", "compile_s"))
    assert baseline["name"] == "torch" and baseline["compile"] is None
    assert result["ratio"] == pytest.approx(result["samples_per_s"] / baseline["samples_per_s"])
    # At equal work: each side's model TFLOP/s, its own FLOP count (the baseline's is the larger: it runs the
    # whole last audio block) ÷ its time; so the samples/s ratio scaled by the two counts.
    assert baseline["flops_per_step_model"] > result["flops_per_step_model"]
    assert result["ratio_equal_work"] == pytest.approx(result["tflops_model"] / baseline["tflops_model"])
    assert result["ratio_equal_work"] == pytest.approx(
        result["ratio"] * result["flops_per_step_model"] / baseline["flops_per_step_model"]
    )
    assert (
        f"ours / torch throughput: {result['ratio']:.2f}× (samples/s); {result['ratio_equal_work']:.2f}× at equal "
        "work (each side's own FLOP count / time)"
    ) in benchmark.report(result)
    # Both steps trained the same model on the same data from a random start: the loss is finite and of the
    # size of a fresh contrastive loss (4 levels of CLIP ≈ log 4 + sigmoid ≈ 10·… at bias −10), not 0.
    assert 0 < result["final_loss"] < 100 and 0 < baseline["final_loss"] < 100


def test_a_cpu_profile_has_empty_tables_and_says_why(result):
    """A CPU trace has no device lines: every table is empty, the by-source table says why, and the text
    report prints that instead of failing."""
    profile = result["profile"]
    assert profile["top_kernels_ms_per_step"] == [] and profile["by_source_ms_per_step"] == []
    assert "op_time_us" not in profile  # the full per-op times are replaced by the by-source table
    assert profile["by_source_note"] == (
        "the trace has no device kernels (a CPU trace has no device lines): no device time by source"
    )
    assert f"    by source: {profile['by_source_note']}" in benchmark.report(result)


def test_model_flops_match_xla_cost_analysis(result):
    """On the XLA attention path XLA counts every matmul the analytic formula counts, plus element-wise work
    (LayerNorm, softmax, GELU, Adam, the log-mel), which at width 64 adds about 20%. Leaving out attention
    (+13% here) or the backward pass (×3) would put the ratio outside the bounds."""
    ratio = result["flops_per_step_cost_analysis"] / result["flops_per_step_model"]
    assert 1.0 <= ratio < 1.3, ratio


@pytest.mark.parametrize("flag", ["--matmul-size", "--batch", "--steps", "--warmup"])
def test_sizes_and_counts_must_be_positive(flag, capsys):
    """`--matmul-size 0` ran the whole benchmark and then divided by a zero peak; now argparse refuses it."""
    with pytest.raises(SystemExit):
        benchmark.parse_args([flag, "0"])
    assert "'0' is not a positive whole number" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["xla_gpu_enable_command_buffer", "gpu_enable_command_buffer=", "=1"])
def test_an_xla_option_is_name_equals_value(text, capsys):
    """--xla-option takes NAME=VALUE with an XLA option's name; a value may be empty (an empty list)."""
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--xla-option", text])
    assert f"{text!r} is not NAME=VALUE with an XLA option's name (xla_...)" in capsys.readouterr().err
    assert benchmark.parse_args(["--xla-option", "xla_a=", "--xla-option", "xla_b=TRUE"]).xla_option == [
        ("xla_a", ""), ("xla_b", True),
    ]


def test_an_option_xla_does_not_know_is_one_error_line():
    """XLA refuses an unknown option when the step compiles; the benchmark says so in one line, no traceback."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    env.pop("WAVLINK_JAX_TRACEBACK", None)
    command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--tiny", "--steps", "1",
               "--xla-option", "xla_no_such_option=1"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --xla-option: INVALID_ARGUMENT: No such compile option: 'xla_no_such_option' "
        "(WAVLINK_JAX_TRACEBACK=1 shows the traceback)"
    )
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--compile"], "--compile applies to the baseline: add --baseline torch"),
    (["--save-trace", "t.json.gz"], "--save-trace keeps the profiler's trace: add --profile N (the steps to trace)"),
])
def test_an_option_without_the_one_it_needs_is_refused(argv, message, capsys):
    """Options that would otherwise do nothing say what they need."""
    with pytest.raises(SystemExit):
        benchmark.parse_args(argv)
    assert message in capsys.readouterr().err


def test_model_flops_of_the_issue_baseline():
    """The analytic count reproduces the FLOP rates of the performance issue's PyTorch table (samples/s ×
    FLOPs per sample = its TFLOP/s) to within 5%: base 689 samples/s ↔ 201 TFLOP/s, large 58 ↔ 405."""
    for model, batch, samples_per_s, tflops in (("base", 128, 689, 201), ("small", 64, 234, 255),
                                                ("medium", 32, 85, 300), ("large", 16, 58, 405)):
        config = benchmark.wavlink_config(model, tiny=False)
        per_sample = benchmark.model_flops(config, batch, 3000, 77, global_only=False) / batch
        assert per_sample * samples_per_s / 1e12 == pytest.approx(tflops, rel=0.05), model


def test_model_flops_count_both_losses_logits_at_every_matryoshka_level():
    """The only part of the count that grows with the batch's square: each Matryoshka level's (batch × batch)
    logits, for the CLIP and the sigmoid loss, forward and backward (too small a share of a step for any ratio
    above to see one of them missing)."""
    config = benchmark.wavlink_config("base", tiny=False)

    def flops(batch):
        return benchmark.model_flops(config, batch, 3000, 77)

    def logits(batch):  # one loss's similarity matmuls at every level, forward
        return 2 * batch * batch * sum(config.matryoshka_dims)

    # two losses, forward and backward; the rest of the count is linear in the batch
    assert flops(16) - 2 * flops(8) == 3 * 2 * (logits(16) - 2 * logits(8))


class FakeDevice:
    """An asynchronous device on a fake clock (for time.perf_counter): `launch` queues `seconds` of work behind
    what is queued and returns at once, after 1 ms of the host's time; the clock reaches the end of the work only
    where the host waits for a result (`block_until_ready`, or `float` of one, as for a jax array)."""

    def __init__(self):
        self.now = self.done_at = 0.0

    def clock(self) -> float:
        return self.now

    def launch(self, seconds: float) -> "FakeResult":
        self.done_at = max(self.now, self.done_at) + seconds
        self.now += 1e-3
        return FakeResult(self)


class FakeResult:
    def __init__(self, device):
        self.device = device

    def block_until_ready(self):
        self.device.now = max(self.device.now, self.device.done_at)
        return self

    def __float__(self):
        self.block_until_ready()
        return 1.0


def test_the_matmul_peak_times_its_repeats_to_their_end_after_warm_up(monkeypatch):
    """The peak is 2·N³ FLOPs per product over the time of `repeats` products from the first's launch to the
    last's end on the device: warm-up (a first call 5 s, the others 1 s each) outside the timed span."""
    import jax

    device = FakeDevice()
    calls = []

    def jit(function):
        def run(a, b):
            calls.append(a.shape)
            return device.launch(5.0 if len(calls) == 1 else 1.0)

        return run

    monkeypatch.setattr(benchmark.time, "perf_counter", device.clock)
    monkeypatch.setattr(jax, "jit", jit)
    tflops = benchmark.measure_matmul_peak(16, repeats=4)
    assert calls == [(16, 16)] * 7  # 3 warm-up, 4 timed
    assert tflops == pytest.approx(2 * 16**3 / 1.0 / 1e12)


def test_the_step_is_timed_after_its_warm_up_to_the_end_of_its_last_step(monkeypatch):
    """`run_ours` times `--steps` calls of the compiled step after `--warmup` untimed ones, from the first timed
    launch to the end of the last step on the device, alternating the two batches: with the first call 5 s and
    every other 1 s on the device, 1 s per step. The compiled step here stands in for the trainer's (no compile):
    cost analysis and memory are the compiled program's."""
    import types

    import numpy as np

    from wavlink_jax import train_step

    device = FakeDevice()
    calls = []

    class Compiled:
        def __call__(self, state, batch):
            calls.append(batch["input_ids"][0, 0].item())
            result = device.launch(5.0 if len(calls) == 1 else 1.0)
            return result, {"loss": result}

        def cost_analysis(self):
            return {"flops": 7e9}

        def memory_analysis(self):
            return types.SimpleNamespace(argument_size_in_bytes=40, temp_size_in_bytes=30, output_size_in_bytes=20,
                                         alias_size_in_bytes=10)

    step = types.SimpleNamespace(lower=lambda state, batch: types.SimpleNamespace(
        compile=lambda compiler_options: Compiled()))
    monkeypatch.setattr(train_step, "build", lambda config, mesh, steps: None)
    monkeypatch.setattr(train_step, "init_state", lambda setup, seed: {"step": 0})
    monkeypatch.setattr(train_step, "make_train_step", lambda setup: step)
    monkeypatch.setattr(benchmark, "time_log_mel", lambda waveform, n_mels: 0.25)
    monkeypatch.setattr(benchmark.time, "perf_counter", device.clock)
    args = benchmark.parse_args(["--tiny", "--steps", "3", "--warmup", "2"])
    config = benchmark.bench_config(args, benchmark.wavlink_config("base", tiny=True))
    batches = [benchmark.random_batch(np.random.default_rng(0), 4, 16000, 16, 1000) for _ in range(2)]
    for i, batch in enumerate(batches):
        batch["input_ids"][0, 0] = i  # which batch a call was given
    ours = benchmark.run_ours(args, config, batches)
    assert calls == [0, 1, 0, 1, 0]  # 2 warm-up steps, then 3 timed
    assert ours["step_time_s"] == pytest.approx(1.0)
    assert ours["flops_per_step_cost_analysis"] == 7e9 and ours["log_mel_s"] == 0.25
    assert ours["program_memory"]["program_bytes"] == 80 and ours["final_loss"] == 1.0


def test_every_figure_is_the_step_time_against_the_counts_and_the_peak(monkeypatch, capsys):
    """`main`'s figures from the measured times (ours 0.5 s per step, the baseline's 0.8 s), the analytic
    counts, the compiled step's cost analysis and the matmul peak: samples/s, TFLOP/s, fractions of the peak
    and both ratios, as --json prints them."""
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # which main would set for this process
    monkeypatch.setattr(benchmark, "measure_matmul_peak", lambda size: 50.0)
    monkeypatch.setattr(benchmark, "run_torch", lambda args, model, config, batches: dict(
        name="torch", compile=None, step_time_s=0.8, peak_memory_bytes=None, compile_s=1.0, final_loss=5.0))
    ours = dict(log_mel_s=0.01, profile=None, init_s=1.0, compile_s=2.0, step_time_s=0.5,
                flops_per_step_cost_analysis=3e12, peak_memory_bytes=None, program_memory={}, final_loss=5.0)
    monkeypatch.setattr(benchmark, "run_ours", lambda args, config, batches: ours)
    result = benchmark.main(["--tiny", "--batch", "8", "--baseline", "torch", "--json"])
    assert json.loads(capsys.readouterr().out) == result

    model = benchmark.wavlink_config("base", tiny=True)
    flops, theirs = (benchmark.model_flops(model, 8, 100, 16, global_only=only) for only in (True, False))
    assert theirs > flops and result["flops_per_step_model"] == flops
    assert result["matmul_peak_tflops"] == 50.0 and result["samples_per_s"] == 16.0
    assert result["tflops_model"] == pytest.approx(flops / 0.5 / 1e12)
    assert result["fraction_of_peak_model"] == pytest.approx(flops / 0.5 / 1e12 / 50.0)
    assert result["tflops_cost_analysis"] == pytest.approx(6.0)
    assert result["fraction_of_peak_cost_analysis"] == pytest.approx(6.0 / 50.0)
    baseline = result["baseline"]
    assert baseline["flops_per_step_model"] == theirs and baseline["samples_per_s"] == pytest.approx(10.0)
    assert baseline["tflops_model"] == pytest.approx(theirs / 0.8 / 1e12)
    assert baseline["fraction_of_peak_model"] == pytest.approx(theirs / 0.8 / 1e12 / 50.0)
    assert result["ratio"] == pytest.approx(1.6)
    assert result["ratio_equal_work"] == pytest.approx((flops / 0.5) / (theirs / 0.8))

    ours["flops_per_step_cost_analysis"] = None  # a backend whose cost analysis gives none
    result = benchmark.main(["--tiny", "--batch", "8", "--json"])
    assert result["tflops_cost_analysis"] is None and result["fraction_of_peak_cost_analysis"] is None
    assert result["baseline"] is None and result["ratio"] is None and result["ratio_equal_work"] is None


def test_a_separate_baseline_s_child_gets_none_of_this_process_s_files(monkeypatch):
    """`--separate-baseline` runs the baseline as `benchmark.py ... --baseline-only` in a child: without the
    options whose files belong to this process (each with its value) and without --json, whose object the
    child prints on its last line."""
    import subprocess as subprocess_module

    seen = []

    def run(command, **kwargs):
        seen.append(command[2:])
        printed = 'warming up\n{"name": "torch", "step_time_s": 2}\n'
        return subprocess_module.CompletedProcess(command, 0, stdout=printed)

    monkeypatch.setattr(subprocess_module, "run", run)
    argv = ["--tiny", "--jsonl", "runs.jsonl", "--baseline", "torch", "--separate-baseline", "--dump-hlo", "step.txt",
            "--profile", "1", "--save-trace", "t.json.gz", "--json", "--steps", "3"]
    assert benchmark.run_torch_in_child(argv) == {"name": "torch", "step_time_s": 2}
    assert seen == [["--tiny", "--baseline", "torch", "--profile", "1", "--steps", "3", "--baseline-only"]]
    # The `--option=value` form too (the child would have appended to the same --jsonl file).
    benchmark.run_torch_in_child(["--jsonl=runs.jsonl", "--steps=3", "--dump-hlo=step.txt", "--save-trace=t.json.gz"])
    assert seen[-1] == ["--steps=3", "--baseline-only"]


@pytest.mark.parametrize(
    "clip_weight, sigmoid_weight",
    [  # `make test` runs both losses at unequal weights (which catch the two weights swapped); each loss alone
        # and the equal weights are `make test-all`'s
        pytest.param(1.0, 0.0, marks=pytest.mark.slow), pytest.param(0.0, 1.0, marks=pytest.mark.slow),
        pytest.param(1.0, 1.0, marks=pytest.mark.slow), (0.7, 1.3),
    ],
)
def test_torch_baseline_computes_our_training_loss(clip_weight, sigmoid_weight):
    """The baseline trains the same function: with our weights exported into it, its loss (log-mel, towers,
    heads, Matryoshka CLIP and sigmoid losses) equals our trainer's loss on the same batch, in fp32."""
    import numpy as np
    import torch
    from flax import nnx

    from wavlink_jax import audio, export, losses, torch_baseline
    from wavlink_jax.models.wavlink import WavLink

    config = benchmark.wavlink_config("base", tiny=True)
    model = WavLink(config, rngs=nnx.Rngs(0))
    batch = benchmark.random_batch(np.random.default_rng(1), 6, 16000, 16, config.text.vocab_size)
    za, zt = model(audio.log_mel_spectrogram(batch["waveform"], 80), batch["input_ids"], batch["attention_mask"])
    ours, _ = losses.matryoshka_loss(
        za, zt, dims=config.matryoshka_dims, logit_scale_clip=model.clip_logit_scale[...],
        logit_scale_sigmoid=model.sigmoid_logit_scale[...], logit_bias=model.sigmoid_logit_bias[...],
        clip_weight=clip_weight, sigmoid_weight=sigmoid_weight,
    )

    torch_model = torch_baseline.build_torch_wavlink(config, window_seconds=1.0, text_length=16)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in export.export_weights(model).items()})
    loss = torch_baseline.TrainingLoss(torch_model, clip_weight=clip_weight, sigmoid_weight=sigmoid_weight)
    with torch.no_grad():
        theirs = loss(
            loss.log_mel(torch.from_numpy(batch["waveform"])),
            torch.from_numpy(batch["input_ids"]).long(),
            torch.from_numpy(batch["attention_mask"]).long(),
        )
    assert float(ours) == pytest.approx(theirs.item(), rel=1e-5)


def test_torch_baseline_step_updates_as_our_optimizer():
    """The baseline's AdamW (clipping, weight decay on ≥ 2-d parameters only, betas, eps, lr) updates as ours
    (`optim.make_optimizer`, constant schedule, no `no_decay` patterns: the benchmark config's) over four steps of
    a toy loss whose gradients are the batch, clipped at 0.5 on some steps and not on others."""
    import ml_collections
    import numpy as np
    import optax
    import torch

    from wavlink_jax import optim, torch_baseline

    class Toy(torch.nn.Module):
        """`kernel`, `bias`, `scale` get the gradients `mel[:2]`, `mel[2]`, `mel[3, 0]`."""

        def __init__(self, start):
            super().__init__()
            self.params = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.tensor(v)) for k, v in start.items()})

        def log_mel(self, waveform):
            return waveform

        def forward(self, mel, input_ids, attention_mask):
            p = self.params
            return (p["kernel"] * mel[:2]).sum() + (p["bias"] * mel[2]).sum() + p["scale"] * mel[3, 0]

    rng = np.random.default_rng(0)
    start = {"kernel": rng.normal(size=(2, 3)), "bias": rng.normal(size=3), "scale": np.array(0.5)}
    start = {k: v.astype(np.float32) for k, v in start.items()}
    mels = [(size * rng.normal(size=(4, 3))).astype(np.float32) for size in (3.0, 0.05)]
    settings = torch_baseline.OptimizerSettings(lr=1e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.3,
                                                grad_clip_norm=0.5)
    toy, unused = Toy(start), torch.zeros(1)
    torch_baseline.time_torch_step(toy, [(torch.from_numpy(m), unused, unused) for m in mels], steps=2, warmup=2,
                                   bf16=False, compile=None, optimizer=settings)

    config = ml_collections.ConfigDict(dict(
        learning_rate=1e-2, schedule="constant", warmup_fraction=0.0, end_lr_fraction=0.0, b1=0.8, b2=0.95,
        eps=1e-3, weight_decay=0.3, grad_clip_norm=0.5, lr_rules=(), no_decay=()))
    tx, _ = optim.make_optimizer(config, start, 4)
    params, state, norms = start, tx.init(start), []
    for mel in mels * 2:  # the batches as the step takes them: 0 (compilation), 1 (warm-up), then 0, 1 timed
        grads = {"kernel": mel[:2], "bias": mel[2], "scale": mel[3, 0]}
        norms.append(float(optax.tree.norm(grads)))
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert min(norms) < 0.5 < max(norms), norms
    for name, value in params.items():  # clipping: torch divides by the norm + 1e-6, optax by the norm
        np.testing.assert_allclose(toy.params[name].detach().numpy(), value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_torch_baseline_heads_and_loss_run_in_fp32_under_the_towers_autocast():
    """The towers run under bf16 autocast; the heads and the loss's logits, fp32 at full precision in ours, must
    not: their outputs and every (batch × batch) similarity matmul are float32, while the towers' are bf16."""
    import numpy as np
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from wavlink_jax import torch_baseline

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                self.seen.append((tuple(out.shape), out.dtype))
            return out

    config = benchmark.wavlink_config("base", tiny=True)
    torch.manual_seed(0)
    module = torch_baseline.TrainingLoss(
        torch_baseline.build_torch_wavlink(config, window_seconds=1.0, text_length=16), clip_weight=1.0,
        sigmoid_weight=1.0,
    )
    heads = []
    for head in (module.model.audio_projection, module.model.text_projection):
        head.register_forward_hook(lambda _, __, out: heads.append(out.dtype))
    batch = benchmark.random_batch(np.random.default_rng(1), 3, 16000, 16, config.text.vocab_size)
    mel = module.log_mel(torch.from_numpy(batch["waveform"]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Matmuls() as matmuls:
        module(mel, torch.from_numpy(batch["input_ids"]).long(), torch.from_numpy(batch["attention_mask"]).long())
    assert heads == [torch.float32, torch.float32]
    logits = [dtype for shape, dtype in matmuls.seen if shape == (3, 3)]
    assert logits == [torch.float32] * len(config.matryoshka_dims)
    assert torch.bfloat16 in {dtype for _, dtype in matmuls.seen}  # the towers did run under autocast


def meta(kind: str, pid: int, tid: int, name: str) -> dict:
    """A trace's metadata event naming a process or thread."""
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}


def kernel(pid: int, tid: int, name: str, dur: float) -> dict:
    """A complete event of `dur` microseconds on line (pid, tid)."""
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": 0, "dur": dur}


# A GPU (pid 1) with a kernel line (tid 7) and the derived XLA Ops line (tid 8); a host thread (pid 2).
LINES = [
    meta("process_name", 1, 0, "/device:GPU:0"), meta("process_name", 2, 0, "/host:CPU"),
    meta("thread_name", 1, 7, "Stream #7(Compute)"), meta("thread_name", 1, 8, "XLA Ops"),
    meta("thread_name", 2, 9, "python"),
]


def write_trace(path: Path, events: list[dict]) -> Path:
    """A gzipped perfetto trace of LINES and `events`, as `jax.profiler.trace` writes it."""
    with gzip.open(path, "wt") as file:
        json.dump({"traceEvents": LINES + events}, file)
    return path


def test_trace_summary_counts_stream_kernels_once(tmp_path):
    """The profile summary reads the device's Stream lines (xprof's layout of a GPU trace), not the derived
    XLA Ops line that repeats the same time, nor host events; times are per step, grouped by kind; each kernel
    comes with its launches per step (one kernel serves identical fusions), and the XLA Ops line gives the same
    time by HLO op, every op's in `op_time_us`."""
    trace = write_trace(tmp_path / "perfetto_trace.json.gz", [
        kernel(1, 7, "sm90_xmma_gemm_bf16bf16_bf16f32", 3000), kernel(1, 7, "cudnn_generated_fort_native_sdpa_sm90", 2000),
        kernel(1, 7, "loop_add_fusion", 500), kernel(1, 7, "loop_add_fusion", 500), kernel(1, 7, "regular_fft", 1000),
        kernel(1, 7, "sm90_xmma_fprop_implicit_gemm_bf16", 400), kernel(1, 7, "loop_convert_fusion", 600),
        kernel(1, 8, "loop_add_fusion.3", 500), kernel(1, 8, "loop_add_fusion.7", 500), kernel(1, 8, "custom-call.1", 3000),
        kernel(2, 9, "PjitFunction(step)", 9000),
    ])
    summary = benchmark.summarize_trace(trace, steps=2, top=2)
    assert summary["lines"] == ["Stream #7(Compute)"]
    assert summary["device_busy_ms_per_step"] == 4.0
    assert summary["by_kind_ms_per_step"] == {  # a type conversion ("convert") is not a convolution
        "matmul": 1.5, "attention": 1.0, "other": 0.8, "fft": 0.5, "convolution": 0.2,
    }
    assert summary["top_kernels_ms_per_step"] == [
        ["sm90_xmma_gemm_bf16bf16_bf16f32", 1.5, 0.5], ["cudnn_generated_fort_native_sdpa_sm90", 1.0, 0.5],
    ]
    kernels = {name: (ms, n) for name, ms, n in benchmark.summarize_trace(trace, steps=2)["top_kernels_ms_per_step"]}
    assert kernels["loop_add_fusion"] == (0.5, 1.0)  # two launches in two steps: one per step
    assert summary["top_ops_ms_per_step"] == [["custom-call.1", 1.5, 0.5], ["loop_add_fusion.3", 0.25, 0.5]]
    assert summary["op_time_us"] == {  # all ops, not only the top 2, over both steps
        "loop_add_fusion.3": [500.0, 1], "loop_add_fusion.7": [500.0, 1], "custom-call.1": [3000.0, 1],
    }


def test_idle_gaps_say_where_the_device_waited(tmp_path):
    """The gaps between kernels on all of a device's streams (a kernel overlapping another on a second stream
    leaves none), per step, by size, and between which kernels; the report prints them. Microseconds: A 0–10,
    B 12–20, C 100–150, D 140–160 (second stream), E 166–170 → gaps of 2 (A→B), 80 (B→C) and 6 (D→E)."""
    second = meta("thread_name", 1, 6, "Stream #6(Compute)")
    events = [{**kernel(1, tid, name, stop - start), "ts": start} for tid, name, start, stop in (
        (7, "C", 100, 150), (7, "A", 0, 10), (7, "B", 12, 20), (6, "D", 140, 160), (7, "E", 166, 170),
    )]
    summary = benchmark.summarize_trace(write_trace(tmp_path / "t.json.gz", [second, *events]), steps=2)
    assert summary["device_busy_ms_per_step"] == 0.046  # (10 + 8 + 50 + 20 + 4) µs over 2 steps
    assert summary["idle_ms_per_step"] == 0.044
    assert summary["idle_by_size_ms_per_step"] == {
        "< 5 µs": [0.001, 0.5], "5–50 µs": [0.003, 0.5], "≥ 50 µs": [0.04, 0.5],
    }
    assert summary["top_gaps_ms_per_step"] == [["B", "C", 0.04, 0.5], ["D", "E", 0.003, 0.5], ["A", "B", 0.001, 0.5]]
    lines = benchmark.idle_table(summary, 80e-6, {})  # the timed step: 80 µs, 34 of them not busy
    assert lines[0].startswith("  idle between kernels 0.04 ms/step under the profiler")
    assert lines[0].endswith("the timed step, in CUDA graphs, leaves 0.03 ms not busy (the figure to read)")
    assert benchmark.idle_table(summary, 80e-6, {"xla_gpu_enable_command_buffer": ""})[0] == (
        "  idle between kernels 0.04 ms/step under the profiler; the timed step, without command buffers, leaves "
        "0.03 ms not busy (the figure to read)"
    )
    assert lines[1].startswith("  the profile's gaps: < 5 µs 0.00 (0.5×), 5–50 µs 0.00 (0.5×)")
    assert lines[2] == "        0.04 ms    0.5×  B → C"
    assert benchmark.idle_table({**summary, "idle_ms_per_step": 0.0}, 80e-6, {}) == []  # no gaps (or no device lines)


def test_idle_gaps_start_where_the_busy_span_ends_and_a_size_limit_is_the_next_size_s():
    """A kernel inside another's span (on a second stream) ends no busy span: the gap after it starts where the
    longer one ends, and follows it; a gap of exactly 5 or 50 µs is one of the next size. Microseconds: A 0–100, B
    10–20 (inside A), C 105–110, D 160–170 → gaps of 5 (A→C) and 50 (C→D)."""
    gaps = benchmark.idle_gaps([(0.0, 100.0, "A"), (10.0, 20.0, "B"), (105.0, 110.0, "C"), (160.0, 170.0, "D")], 1)
    assert gaps["idle_ms_per_step"] == 0.055
    assert gaps["idle_by_size_ms_per_step"] == {"< 5 µs": [0.0, 0.0], "5–50 µs": [0.005, 1.0], "≥ 50 µs": [0.05, 1.0]}
    assert gaps["top_gaps_ms_per_step"] == [["C", "D", 0.05, 1.0], ["A", "C", 0.005, 1.0]]


def test_a_trace_without_stream_lines_reads_every_device_line_but_the_derived_ones(tmp_path):
    """Where no device line is named `Stream`, the kernels are on the device's other lines: not the derived XLA
    Ops, XLA Modules and Steps lines, which repeat the same time (the busy time would be counted twice)."""
    lines = [meta("process_name", 1, 0, "/device:GPU:0"), meta("thread_name", 1, 5, "Kernels"),
             meta("thread_name", 1, 8, "XLA Ops"), meta("thread_name", 1, 9, "XLA Modules"),
             meta("thread_name", 1, 10, "Steps")]
    events = [kernel(1, 5, "loop_add_fusion", 300), kernel(1, 8, "loop_add_fusion.3", 300),
              kernel(1, 9, "jit_step", 400), kernel(1, 10, "0", 400)]
    with gzip.open(tmp_path / "trace.json.gz", "wt") as file:
        json.dump({"traceEvents": lines + events}, file)
    summary = benchmark.summarize_trace(tmp_path / "trace.json.gz", steps=1)
    assert summary["lines"] == ["Kernels"] and summary["device_busy_ms_per_step"] == 0.3
    assert summary["op_time_us"] == {"loop_add_fusion.3": [300.0, 1]}


def test_without_an_xla_ops_line_the_kernels_hlo_op_names_the_ops(tmp_path):
    """jax 0.11.2 on an H200 wrote only the Stream line: each kernel event's `hlo_op` argument names its HLO
    instruction (a cuDNN call's several kernels add up under one op). Where kernels carry no `hlo_op`, the ops
    are named after the kernels, and the by-source note says so and lists the arguments they do carry."""
    def launch(name: str, dur: float, **arguments: str) -> dict:
        return {**kernel(1, 7, name, dur), "args": {"correlation_id": "1", **arguments}}

    stream_only = [line for line in LINES if line["args"]["name"] != "XLA Ops"]
    events = [launch("input_reduce_fusion", 300, hlo_op="input_reduce_fusion.3"),
              launch("input_reduce_fusion", 100, hlo_op="input_reduce_fusion.5"),
              launch("cudnn_flash_bprop", 500, hlo_op="custom-call.2"), launch("dot_do_o", 100, hlo_op="custom-call.2"),
              launch("memset", 20)]
    with gzip.open(tmp_path / "named.json.gz", "wt") as file:
        json.dump({"traceEvents": stream_only + events}, file)
    summary = benchmark.summarize_trace(tmp_path / "named.json.gz", steps=1)
    assert summary["op_time_us"] == {
        "input_reduce_fusion.3": [300.0, 1], "input_reduce_fusion.5": [100.0, 1], "custom-call.2": [600.0, 2],
    }
    assert summary["device_busy_ms_per_step"] == 1.02  # the kernels' own time, the memset's too
    assert summary["kernel_arguments"] == ["correlation_id", "hlo_op"]

    # Two steps of the cuDNN call: each of its kernels' launches add up, 2 per step, as its time does.
    with gzip.open(tmp_path / "two_steps.json.gz", "wt") as file:
        json.dump({"traceEvents": stream_only + events[2:4] * 2}, file)
    summary = benchmark.summarize_trace(tmp_path / "two_steps.json.gz", steps=2)
    assert summary["op_time_us"] == {"custom-call.2": [1200.0, 4]}
    assert summary["top_ops_ms_per_step"] == [["custom-call.2", 0.6, 2.0]]

    with gzip.open(tmp_path / "unnamed.json.gz", "wt") as file:
        json.dump({"traceEvents": stream_only + [launch("input_reduce_fusion", 300, kernel_details="grid:1")]}, file)
    summary = benchmark.summarize_trace(tmp_path / "unnamed.json.gz", steps=1)
    assert summary["op_time_us"] == {}
    assert summary["kernel_time_us"] == {"input_reduce_fusion": [300.0, 1]}
    profile = benchmark.time_by_source(summary["op_time_us"], [], 1, 0.3, kernel_time_us=summary["kernel_time_us"],
                                       kernel_arguments=summary["kernel_arguments"])
    assert profile["by_source_note"].startswith("ops named after their kernels")
    assert "its kernel events' arguments: correlation_id, kernel_details;" in profile["by_source_note"]


def test_a_trace_without_op_names_is_attributed_by_kernel_name():
    """No XLA Ops line and no hlo_op (GPU run 3's trace): a kernel stands for the instruction it is named after
    ('.' as '_'), with all its launches, so two identical GELU fusions sharing `loop_gelu_fusion`'s kernel put
    two launches' time and bytes on its line; a cuBLAS kernel is named after no instruction and is counted
    apart; the note says how the ops were named."""
    found = hlo_traffic.launches(WITH_FRAMES)
    kernels = {"loop_gelu_fusion": [400.0, 4], "loop_gelu_grad_fusion": [800.0, 2], "gemm_1": [600.0, 2],
               "nvjet_sm90_tst_128x160": [100.0, 2]}  # µs and launches over 2 steps
    assert benchmark.ops_from_kernel_names(kernels, found) == {
        "loop_gelu_fusion": [400.0, 4], "loop_gelu_grad_fusion": [800.0, 2], "gemm.1": [600.0, 2],
        "nvjet_sm90_tst_128x160": [100.0, 2],
    }
    # '-' is written '_' as '.' is: the fusion wrapper's `wrapped_dynamic-slice.3` runs `wrapped_dynamic_slice_3`
    sliced = dataclasses.replace(found[0], name="wrapped_dynamic-slice.3")
    assert benchmark.ops_from_kernel_names({"wrapped_dynamic_slice_3": [50.0, 2]}, [sliced]) == {
        "wrapped_dynamic-slice.3": [50.0, 2],
    }
    profile = benchmark.time_by_source({}, found, 2, 1.0, kernel_time_us=kernels, kernel_arguments=["correlation_id"])
    gb = 2 * 8192 * 8192 * 2 / 1e9  # a bf16 8192² array read and one written
    rows = {source: (ms, n, gigabytes) for source, ms, n, gigabytes, _ in profile["by_source_ms_per_step"]}
    assert rows["forward wavlink_jax/models/layers.py:40:12 gelu_exact"] == (0.2, 2.0, round(2 * gb, 3))
    assert rows["backward wavlink_jax/models/layers.py:40:12 gelu_exact"] == (0.4, 1.0, round(gb, 3))
    assert rows["(op not in the HLO)"] == (0.05, 1.0, 0.0)
    assert profile["by_source_total"]["not_in_hlo_ms_per_step"] == 0.05
    assert profile["by_source_note"] == (
        "ops named after their kernels (the trace names no HLO op: no XLA Ops line, no hlo_op argument): a kernel "
        "that serves identical fusions counts, with their launches, under the one it is named after; cuBLAS and "
        "cuDNN kernels are no HLO names; its kernel events' arguments: correlation_id; ops of the trace that are no "
        "launch of the HLO's entry computation (1): nvjet_sm90_tst_128x160"
    )
    # Where the trace names its ops, the kernels are not needed.
    named = benchmark.time_by_source({"loop_gelu_fusion": [200.0, 2]}, found, 2, 1.0, kernel_time_us=kernels)
    assert [row[0] for row in named["by_source_ms_per_step"]] == ["forward wavlink_jax/models/layers.py:40:12 gelu_exact"]


def test_a_command_buffers_kernels_are_attributed_by_kernel_name(tmp_path):
    """jax 0.11.2 on an H200 (GPU run 4) named a kernel run inside one of XLA's command buffers after the buffer
    (`hlo_op` "command_buffer_4", no HLO instruction): such an op's time is split by kernel, each fusion's kernel
    goes to the instruction it is named after, adding up with the same kernel's launches named by their own op,
    and a cuBLAS kernel stays apart; the note names the buffers."""
    def launch(name: str, dur: float, op: str) -> dict:
        return {**kernel(1, 7, name, dur), "args": {"hlo_op": op, "cuda_graph_id": "1380"}}

    events = [launch("loop_gelu_fusion", 100, "command_buffer_4"), launch("nvjet_sm90_tst", 300, "command_buffer_4"),
              launch("loop_gelu_fusion", 50, "loop_gelu_fusion"),
              launch("loop_gelu_grad_fusion", 200, "loop_gelu_grad_fusion")]
    summary = benchmark.summarize_trace(write_trace(tmp_path / "buffers.json.gz", events), steps=1)  # no Ops events
    assert summary["kernels_of_op_us"] == {
        "command_buffer_4": {"loop_gelu_fusion": [100.0, 1], "nvjet_sm90_tst": [300.0, 1]},
        "loop_gelu_fusion": {"loop_gelu_fusion": [50.0, 1]},
        "loop_gelu_grad_fusion": {"loop_gelu_grad_fusion": [200.0, 1]},
    }
    profile = benchmark.with_time_by_source(summary, hlo_traffic.launches(WITH_FRAMES), steps=1)
    assert [row[:3] for row in profile["by_source_ms_per_step"]] == [
        ["(op not in the HLO)", 0.3, 1.0], ["backward wavlink_jax/models/layers.py:40:12 gelu_exact", 0.2, 1.0],
        ["forward wavlink_jax/models/layers.py:40:12 gelu_exact", 0.15, 2.0],
    ]
    assert profile["by_source_note"] == (
        "kernels run in ops that are no HLO instruction (XLA's command buffers, 1: command_buffer_4) are named after "
        "their kernels; cuBLAS and cuDNN kernels are no HLO names; ops of the trace that are no launch of the HLO's "
        "entry computation (1): nvjet_sm90_tst"
    )
    assert not {"op_time_us", "kernel_time_us", "kernels_of_op_us"} & set(profile)


def test_device_time_is_attributed_to_source_lines_with_bytes_and_bandwidth(tmp_path):
    """Two steps of test_hlo_traffic's module (bf16 8192² arrays), with a second GELU launch of the same line
    (another layer's): each XLA op's time goes to its launch's source line, whatever its leading '%', with the
    bytes its launches move per step (each once per step) and GB/ms = TB/s; an op that is no launch of the HLO
    gets its own row and is named; the total says how much of the device's busy time was attributed."""
    found = hlo_traffic.launches(WITH_FRAMES)
    gelu = next(launch for launch in found if launch.name == "loop_gelu_fusion")
    found.append(dataclasses.replace(gelu, name="loop_gelu_fusion.1"))
    ops = [("%loop_gelu_fusion", 100), ("loop_gelu_fusion.1", 100), ("loop_gelu_grad_fusion", 400), ("gemm.1", 300),
           ("fusion.99", 50)]  # µs per step
    trace = write_trace(tmp_path / "perfetto_trace.json.gz", [
        *(kernel(1, 8, name, us) for name, us in ops for _ in range(2)),
        *(kernel(1, 7, "a_kernel", 1000) for _ in range(2)),  # the device is busy 1 ms per step
    ])
    summary = benchmark.summarize_trace(trace, steps=2)
    profile = benchmark.time_by_source(summary["op_time_us"], found, 2, summary["device_busy_ms_per_step"])

    gb = 2 * 8192 * 8192 * 2 / 1e9  # a bf16 8192² array read and one written: 0.268 GB
    gemm_gb = gb + 8 * 8 * 2 / 1e9  # x read twice, an 8×8 bf16 result written
    assert profile["by_source_ms_per_step"] == [
        ["backward wavlink_jax/models/layers.py:40:12 gelu_exact", 0.4, 1.0, round(gb, 3), round(gb / 0.4, 2)],
        ["forward wavlink_jax/models/layers.py:276:30 EncoderBlock.__call__ [GEMM]", 0.3, 1.0, round(gemm_gb, 3),
         round(gemm_gb / 0.3, 2)],
        ["forward wavlink_jax/models/layers.py:40:12 gelu_exact", 0.2, 2.0, round(2 * gb, 3), round(2 * gb / 0.2, 2)],
        ["(op not in the HLO)", 0.05, 1.0, 0.0, None],
    ]
    assert profile["by_source_total"] == {
        "attributed_ms_per_step": 0.9, "launches_per_step": 4.0, "GB_per_step": round(3 * gb + gemm_gb, 3),
        "TB_s": round((3 * gb + gemm_gb) / 0.9, 2), "not_in_hlo_ms_per_step": 0.05, "device_busy_ms_per_step": 1.0,
        "fraction_of_device_busy": 0.9,
    }
    assert profile["by_source_note"] == (
        "ops of the trace that are no launch of the HLO's entry computation (1): fusion.99"
    )
    assert benchmark.source_table(profile) == [
        "    by source line (ms/step, launches/step, GB/step, TB/s):",
        "        0.40 ms    1.0×     0.27 GB  0.67 TB/s  backward wavlink_jax/models/layers.py:40:12 gelu_exact",
        "        0.30 ms    1.0×     0.27 GB  0.89 TB/s  forward wavlink_jax/models/layers.py:276:30 "
        "EncoderBlock.__call__ [GEMM]",
        "        0.20 ms    2.0×     0.54 GB  2.68 TB/s  forward wavlink_jax/models/layers.py:40:12 gelu_exact",
        "        0.05 ms    1.0×     0.00 GB     - TB/s  (op not in the HLO)",
        "    attributed 0.90 of 1.00 ms device busy (90%), 1.07 GB at 1.19 TB/s; 0.05 ms in ops not in the HLO",
        f"    by source: {profile['by_source_note']}",
    ]

    plain = benchmark.time_by_source(summary["op_time_us"], hlo_traffic.launches(WITHOUT_FRAMES), 2, 1.0)
    assert [row[0] for row in plain["by_source_ms_per_step"]] == [
        "backward loop_gelu_grad_fusion", "GEMM", "(op not in the HLO)", "forward loop_gelu_fusion",
    ]  # without stack frames, by kind; the second GELU launch (0.1 ms) is not in this module
    assert plain["by_source_note"].endswith("the program has no stack frames: the rows are hlo_traffic's kinds, "
                                            "not source lines")


def test_gpu_check_summary_prints_each_profile_by_source(result, tmp_path):
    """gpu_check.sh's closing summary (its Python, run on a bench.jsonl row of this run whose profile has a
    by-source table) prints the table after the kernels, with the benchmark's own printer."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    summary = re.search(r'"\$JSONL" <<\'EOF\'[^\n]*\n(.*?)\nEOF\n', script, re.S)[1]
    profile = {
        **result["profile"],
        **benchmark.time_by_source({"gemm.1": [600.0, 2]}, hlo_traffic.launches(WITH_FRAMES), 2, 0.4),
    }
    jsonl = tmp_path / "bench.jsonl"
    jsonl.write_text(json.dumps({**result, "label": "tiny", "profile": profile}) + "\n")
    done = subprocess.run(
        [sys.executable, "-", str(jsonl)], input=summary, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\n".join(benchmark.source_table(profile)) in done.stdout
    assert f"| {result['ratio']:.2f} | {result['ratio_equal_work']:.2f} |" in done.stdout  # by samples/s, equal work
    assert "  0.30 ms    1.0×     0.27 GB  0.89 TB/s  forward wavlink_jax/models/layers.py:276:30" in done.stdout


def _route_cudnn_through_xla(monkeypatch, *, drop_causal: bool = False) -> list:
    """Run `implementation="cudnn"` calls through XLA (CPUs have no cuDNN), recording their sequence lengths;
    `drop_causal` simulates a kernel that ignores the causal mask."""
    import jax

    original = jax.nn.dot_product_attention
    lengths = []

    def fake(q, k, v, *, implementation=None, is_causal=False, **kwargs):
        if implementation == "cudnn":
            lengths.append(q.shape[1])
            is_causal = is_causal and not drop_causal
        return original(q, k, v, implementation="xla", is_causal=is_causal, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    from wavlink_jax.models import layers  # a fresh memory of jax's answers on odd lengths, for this test alone

    monkeypatch.setattr(layers, "cudnn_trains_unpadded", functools.cache(layers.cudnn_trains_unpadded.__wrapped__))
    return lengths


def test_cudnn_unpadded_reports_which_towers_odd_lengths_cudnn_got_as_they_are(monkeypatch):
    """`--attention cudnn_unpadded` records, per tower with an odd sequence, jax's answer for the tower's own
    shape (here a jax that trains base's 1501 audio positions as they are but refuses the causal text's 77):
    the 10 s window's 501 positions are asked too, and the report line says it."""
    import jax

    from wavlink_jax.models import layers

    original = jax.nn.dot_product_attention
    asked = []

    def fake(q, k, v, *, implementation=None, is_causal=False, **kwargs):
        asked.append((q.shape[1:], is_causal, kwargs.get("key_value_seq_lengths") is not None))
        if is_causal:
            raise NotImplementedError(f"Unsupported sequence length Q {q.shape[1]}, KV {k.shape[1]}.")
        return original(q, k, v, implementation="xla", is_causal=is_causal, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    monkeypatch.setattr(layers, "cudnn_trains_unpadded", functools.cache(layers.cudnn_trains_unpadded.__wrapped__))
    model = benchmark.wavlink_config("base", tiny=False)
    assert benchmark.odd_lengths_unpadded(model, 3000, 77, "bfloat16") == {"audio": True, "text": False}
    assert asked == [((1501, 8, 64), False, False), ((77, 8, 64), True, True)]
    assert benchmark.odd_lengths_unpadded(model, 1000, 77, "bfloat16") == {"audio": True, "text": False}
    assert asked[-1] == ((501, 8, 64), False, False)
    assert benchmark.unpadded_text({"audio": True, "text": False}) == " (audio unpadded, text padded)"
    assert benchmark.unpadded_text(None) == ""


def test_attention_parity_check_runs_our_modules_padded_cudnn_path(monkeypatch, capsys):
    """gpu_check's parity check drives `layers.Attention` itself: the cuDNN calls see the padded lengths
    (1501 → 1504, 77 → 80) and, with the padding masked, agree with XLA to bf16 rounding."""
    import attention_parity

    lengths = _route_cudnn_through_xla(monkeypatch)
    status = attention_parity.main(
        ["--batch", "1", "--json", "--cases", "whisper-base-30s", "clip-text-b32-causal-padded"]
    )
    summary = json.loads(capsys.readouterr().out)
    assert status == 0 and summary["ok"], summary
    assert set(lengths[1:]) == {1504, 80}  # lengths[0]: the script's probe that cuDNN attention runs here
    assert summary["worst"] < 1e-2


def test_attention_parity_check_fails_on_a_wrong_kernel(monkeypatch, capsys):
    """A cuDNN path that lost the text tower's causal mask must fail the check."""
    import attention_parity

    _route_cudnn_through_xla(monkeypatch, drop_causal=True)
    status = attention_parity.main(["--batch", "1", "--json", "--cases", "clip-text-b32-causal-padded"])
    summary = json.loads(capsys.readouterr().out)
    assert status == 1 and not summary["ok"] and summary["worst"] > 2e-2


def test_attention_parity_check_fails_on_a_nan_gradient(monkeypatch, capsys):
    """A NaN error fails the check wherever it comes (Python's max passed over one that was not first, and every
    benchmark run would have died on a NaN loss after compiling)."""
    import attention_parity

    def compare(case, batch, candidate):
        nan_backward = case.startswith("clip")
        return {"case": case, "length": 80, "heads": 8, "causal": nan_backward, "out": 4e-3, "cudnn_custom_calls": 2,
                "d_input": float("nan") if nan_backward else 4e-3, "d_params": float("nan") if nan_backward else 4e-3,
                "padded": True}

    monkeypatch.setattr(attention_parity, "cudnn_unavailable", lambda: None)
    monkeypatch.setattr(attention_parity, "compare", compare)
    status = attention_parity.main(["--batch", "1", "--cases", "whisper-base-30s", "clip-text-b32-causal-padded"])
    assert status == 1 and "attention parity FAILED (worst nan" in capsys.readouterr().out


def test_attention_parity_check_fails_on_a_case_that_raises(monkeypatch, capsys):
    """A case that raises (a shape cuDNN has no plan for) fails the check, though the cases that ran agree."""
    import attention_parity

    def compare(case, batch, candidate):
        if case.startswith("clip"):
            raise RuntimeError("no cuDNN plan for this shape")
        return {"case": case, "length": 1504, "heads": 8, "causal": False, "out": 4e-3, "cudnn_custom_calls": 2,
                "d_input": 4e-3, "d_params": 4e-3, "padded": True}

    monkeypatch.setattr(attention_parity, "cudnn_unavailable", lambda: None)
    monkeypatch.setattr(attention_parity, "compare", compare)
    status = attention_parity.main(["--batch", "1", "--cases", "whisper-base-30s", "clip-text-b32-causal-padded"])
    out = capsys.readouterr().out
    assert status == 1
    assert "  clip-text-b32-causal-padded: FAILED with RuntimeError('no cuDNN plan for this shape')" in out
    assert "attention parity FAILED (worst 4.00e-03, bound 0.02)" in out


@pytest.mark.parametrize("refused", [False, True])
def test_the_unpadded_probe_answers_whatever_the_answer(monkeypatch, capsys, refused):
    """`--unpadded-probe`: cuDNN attention at an odd length unpadded and unmasked, against the padded and masked
    form `Attention` runs. Accepted, the two agree (the padded rows cut off); refused (as jax 0.10.2 refuses any
    odd length for training), the error is the answer. Then `Attention`'s cudnn_unpadded form against XLA, each
    case at its own length where jax takes it, else padded: the status is that check's, 0 either way here."""
    import jax
    import attention_parity

    lengths = _route_cudnn_through_xla(monkeypatch)
    routed = jax.nn.dot_product_attention

    def refusing(q, k, v, *, implementation=None, **kwargs):
        if refused and implementation == "cudnn" and q.shape[1] % 2:
            raise NotImplementedError(f"Unsupported sequence length Q {q.shape[1]}, KV {k.shape[1]}.")
        return routed(q, k, v, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", refusing)
    monkeypatch.setattr(attention_parity, "PROBE_HEADS", 2)
    monkeypatch.setattr(attention_parity, "PROBE_LENGTH", 21)
    argv = ["--unpadded-probe", "2", "--batch", "1", "--cases", "clip-text-b32-causal-padded"]
    assert attention_parity.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    probe_lengths = set(lengths) - {16}  # 16: the availability probe
    assert attention_parity.main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    probe = summary["unpadded_probe"]
    assert probe["padded_ms"] > 0 and probe["accepted"] is not refused
    assert summary["ok"] and summary["candidate"] == "cudnn_unpadded"
    [case] = summary["cases"]
    assert case["padded"] is refused and case["out"] < 1e-2
    if refused:
        assert "Unsupported sequence length Q 21" in probe["unpadded_error"] and probe_lengths == {32, 80}
        assert lines[0].startswith("unpadded probe (batch 2, 21 positions, 2 heads, fwd+bwd): refused (NotImplemented")
        assert lines[2].startswith("  clip-text-b32-causal-padded (length 77, 8 heads, causal, padded for cuDNN): ")
    else:
        assert probe["relative_error"] < 1e-2 and probe_lengths == {32, 21, 77}
        accepted = r"unpadded probe .*: accepted, [\d.]+ ms against [\d.]+ ms padded \([\d.]+×\), relative error"
        assert re.match(accepted, lines[0])
        assert lines[2].startswith("  clip-text-b32-causal-padded (length 77, 8 heads, causal, unpadded): ")
    assert lines[1] == "jax {} on cpu: cudnn_unpadded vs xla, bf16, batch 1".format(jax.__version__)
    assert lines[-1].startswith("attention parity OK")


def test_the_unpadded_probe_fails_when_the_unpadded_form_disagrees(monkeypatch, capsys):
    """The probe's status is its check's: a cudnn_unpadded form that disagrees with XLA fails it (gpu_check.sh then
    leaves that form's run out), and `--candidate` cannot name another form beside `--unpadded-probe`."""
    import attention_parity

    def compare(case, batch, candidate):
        assert candidate == "cudnn_unpadded"
        return {"case": case, "length": 77, "heads": 8, "causal": True, "out": 0.5, "d_input": 0.5, "d_params": 0.5,
                "cudnn_custom_calls": 2, "padded": False}

    probe = {"batch": 2, "length": 21, "heads": 2, "accepted": True, "padded_ms": 1.0, "unpadded_ms": 0.9,
             "relative_error": 1e-3}
    monkeypatch.setattr(attention_parity, "cudnn_unavailable", lambda: None)
    monkeypatch.setattr(attention_parity, "compare", compare)
    monkeypatch.setattr(attention_parity, "unpadded_probe", lambda batch: probe)
    assert attention_parity.main(["--unpadded-probe", "2", "--cases", "clip-text-b32-causal-padded"]) == 1
    out = capsys.readouterr().out
    assert "accepted, 0.900 ms against 1.000 ms padded" in out and "attention parity FAILED (worst 5.00e-01" in out
    with pytest.raises(SystemExit):
        attention_parity.main(["--unpadded-probe", "2", "--candidate", "cudnn"])
    assert "--unpadded-probe checks the cudnn_unpadded form: no other --candidate" in capsys.readouterr().err


def test_data_benchmark_rates_are_of_the_fastest_pass_per_cpu_and_per_wall_second(monkeypatch):
    """scripts/benchmark_data.py's stage rows: clips per CPU-second and per wall-second, each of its fastest pass
    (4 clips; CPU 0.5 s and wall 2 s a clip in the first pass, 0.25 s and 3 s in the second)."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # what importing it sets
    import benchmark_data

    clock = {"cpu": 0.0, "wall": 0.0}
    costs = iter([(0.5, 2.0)] * 4 + [(0.25, 3.0)] * 4)

    def decode(clip):
        cpu, wall = next(costs)
        clock["cpu"] += cpu
        clock["wall"] += wall

    monkeypatch.setattr(benchmark_data.time, "process_time", lambda: clock["cpu"])
    monkeypatch.setattr(benchmark_data.time, "perf_counter", lambda: clock["wall"])
    assert benchmark_data._best_rate(decode, ["a", "b", "c", "d"], repeats=2) == (4.0, 0.5)


def test_loss_benchmark_ratios_are_ring_over_dense(monkeypatch, capsys):
    """scripts/benchmark_loss.py's table: the time ratio column is ring ÷ dense (medians of 2 and 3 ms here, for
    the dense and the ring form, timed in that order), on this process's 8 host devices."""
    import statistics

    import benchmark_loss

    medians = iter([0.002, 0.003])
    monkeypatch.setattr(statistics, "median", lambda times: next(medians))
    monkeypatch.setattr(sys, "argv", ["benchmark_loss.py", "--sizes", "16", "--dim", "8", "--kinds", "clip",
                                      "--repeats", "1"])
    benchmark_loss.main()
    [row] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| clip |")]
    assert row.startswith("| clip | 16 | 2.0 | 3.0 | 1.50 | ")


def test_attention_parity_without_cudnn_says_it_needs_a_gpu(capsys):
    """On a machine without cuDNN (this CPU, nothing routed) the check ends with one line saying why, and exit
    status 1, instead of a per-case `FAILED with RuntimeError('cuDNN is not detected.')` and `worst inf`."""
    import attention_parity

    status = attention_parity.main(["--batch", "1", "--cases", "clip-text-b32-causal-padded"])
    captured = capsys.readouterr()
    assert status == 1 and captured.out == ""
    assert captured.err.splitlines() == [
        "error: attention_parity.py needs a GPU with cuDNN (jax backend: cpu): cuDNN is not detected."
    ]


@pytest.mark.slow
def test_regional_compile_compiles_the_blocks_and_keeps_the_loss():
    """`--compile regional` compiles every transformer block of both towers (and nothing else) and the
    compiled forward computes the eager loss."""
    import numpy as np
    import torch

    from wavlink_jax import torch_baseline

    config = benchmark.wavlink_config("base", tiny=True)
    torch.manual_seed(0)
    module = torch_baseline.TrainingLoss(
        torch_baseline.build_torch_wavlink(config, window_seconds=1.0, text_length=16), clip_weight=1.0,
        sigmoid_weight=1.0,
    )
    batch = benchmark.random_batch(np.random.default_rng(1), 4, 16000, 16, config.text.vocab_size)
    inputs = (
        module.log_mel(torch.from_numpy(batch["waveform"])),
        torch.from_numpy(batch["input_ids"]).long(),
        torch.from_numpy(batch["attention_mask"]).long(),
    )
    with torch.no_grad():
        eager = module(*inputs).item()
        forward = torch_baseline.compiled_forward(module, "regional")
        compiled = [name for name, m in module.named_modules() if getattr(m, "_compiled_call_impl", None)]
        assert compiled == [f"model.audio.layers.{i}" for i in range(2)] + [
            f"model.text.text_model.encoder.layers.{i}" for i in range(2)
        ]
        assert forward(*inputs).item() == pytest.approx(eager, rel=1e-5)
