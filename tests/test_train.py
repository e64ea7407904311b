"""Training package: DeepSpeed JSON, schedule, loop, checkpoints, resume, NaN stop, CLI errors.

Everything runs on CPU with a tiny MoE (2 layers, 4 experts, MTP depth 1) on a synthetic
folder corpus with the bytes tokenizer; caches live in tmp_path. One-process runs happen
in-process (the gloo group of world size 1 is created once per pytest process); the exact
kill-and-resume test uses subprocesses so the kill is a real SIGKILL.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from moe.config import load_config
from moe.runs import atomic_write
from moe.runs import checkpoint as ckpt
from moe.train.engine import deepspeed_config, lr_multiplier, param_groups
from moe.train.metrics import read_rows

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"tokens_per_s", "flops_per_s", "mfu"}

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega").split()


def make_corpus(root: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """A folder of small, learnable documents (repeated templates over a small vocabulary)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = []
        for j in range(60):
            a, b = rng.choice(WORDS), rng.choice(WORDS)
            lines.append(f"def {a}_{j % 7}(x):\n    return x.{b} + {j % 10}\n")
        (root / f"doc{i:03d}.txt").write_text("".join(lines))
    return root


def tiny_overrides(tmp_path: Path, **extra) -> list[str]:
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        make_corpus(corpus)
    base = {
        "name": "tiny-test",
        "model.vocab_size": 257, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
        "model.ffn_dim": 64, "model.first_k_dense": 1,
        "moe.n_routed": 4, "moe.n_shared": 1, "moe.expert_ffn_dim": 16, "moe.top_k": 2,
        "moe.n_groups": 1, "moe.topk_groups": 1, "moe.gamma": 0.01,
        "mtp.depth": 1, "mtp.weight_schedule": "step", "mtp.switch_at": 0.5,
        "data.corpus": str(corpus), "data.tokenizer": "bytes", "data.val_fraction": 0.2,
        "data.cache_dir": str(tmp_path / "cache"),
        "train.seq_len": 32, "train.micro_batch_size": 4, "train.max_steps": 30,
        "train.lr": 3e-3, "train.warmup_steps": 5, "train.eval_every": 10,
        "train.eval_batches": 4, "train.ckpt_every": 10, "train.log_every": 1,
        "train.peak_flops": 1e11,
        # pinned: `auto` resolves per machine (bf16 on CPUs with native bf16), and these
        # tests compare runs to fp32 rounding; bf16 paths are tested where named
        "train.precision": "fp32",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_cfg(tmp_path: Path, **extra):
    return load_config(None, tiny_overrides(tmp_path, **extra))


def clean_env(threads: int = 1) -> dict:
    """Environment for child processes: no inherited process-group variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    return env


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_TESTBED_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def _private_process_group():
    """In-process runs create a one-rank gloo group; tear it down after this module so
    later test modules can create their own."""
    import torch.distributed as dist

    had = dist.is_available() and dist.is_initialized()
    yield
    if not had and dist.is_available() and dist.is_initialized():
        from moe.parallel import release_groups

        release_groups()  # with the groups megatron and DeepSpeed cached


# --------------------------------------------------------------------------------------
# Pure pieces (no process group)
# --------------------------------------------------------------------------------------


def test_cpu_precision_probe_times_the_runs_own_model(tmp_path):
    """`auto` on CPU times a training step of the run's model cut to one block of each kind
    (bounded in FLOPs), and answers 0 where bf16 cannot run the model at all."""
    from moe.train import engine

    cfg = tiny_cfg(tmp_path, **{"model.n_layers": 6, "mtp.depth": 2})
    probe = engine._probe_config(cfg)
    assert (probe.model.n_layers, probe.model.first_k_dense, probe.mtp.depth) == (2, 1, 0)
    assert probe.model.d_model == cfg.model.d_model and probe.moe.n_routed == cfg.moe.n_routed
    assert (probe.train.micro_batch_size, probe.train.seq_len) == (4, 32)  # small: unchanged
    assert cfg.model.n_layers == 6  # the run's config is not touched
    big = tiny_cfg(tmp_path, **{"model.d_model": 512, "model.ffn_dim": 2048, "train.seq_len": 4096,
                                "train.micro_batch_size": 8, "moe.expert_ffn_dim": 256})
    pb = engine._probe_config(big)
    from moe.accounting import count_params

    fl = count_params(pb).flops_per_token_train * pb.train.micro_batch_size * pb.train.seq_len
    assert fl <= engine.PROBE_STEP_FLOPS and pb.train.micro_batch_size == 1
    ratio = engine.cpu_bf16_speedup(cfg)
    assert ratio > 0 and math.isfinite(ratio)
    # bf16 rows of 40 bytes: torch._grouped_mm refuses them, so the bf16 layer runs the
    # per-expert loop (moe.moe_layer.experts.grouped_mm_aligned; it used to fail, probe 0.0)
    # while fp32 rows of 80 bytes keep grouped_mm: bf16 runs, far slower (0.29x measured), and auto
    # keeps fp32
    odd = tiny_cfg(tmp_path, **{"model.d_model": 20, "model.n_heads": 2})
    assert 0.0 < engine.cpu_bf16_speedup(odd) < engine.CPU_BF16_MIN_SPEEDUP
    odd.train.precision = "auto"
    assert engine.resolve_precision(odd, "cpu") == "fp32"


def test_deepspeed_config_is_generated_from_config(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, **{"train.zero_stage": 2, "train.grad_accum": 3,
                                "train.grad_clip": 0.5, "train.betas": "[0.8, 0.9]",
                                "train.eps": 1e-7, "train.weight_decay": 0.05,
                                "train.lr": 1e-3, "train.precision": "auto"})
    ds = deepspeed_config(cfg, world_size=2, device="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    opt = ds["optimizer"]
    assert opt["type"] == "AdamW"
    assert opt["params"]["lr"] == 1e-3 and opt["params"]["betas"] == [0.8, 0.9]
    assert opt["params"]["eps"] == 1e-7 and opt["params"]["weight_decay"] == 0.05
    # precision auto: bf16 on GPU; on CPU what the matmul probe finds faster
    from moe.train import engine

    assert ds["fp16"]["enabled"] is False
    assert ds["bf16"]["enabled"] is (engine.cpu_bf16_speedup(cfg) >= engine.CPU_BF16_MIN_SPEEDUP)
    assert deepspeed_config(cfg, 1, device="cuda")["bf16"]["enabled"] is True
    json.dumps(ds)  # plain JSON
    with monkeypatch.context() as m:
        m.setattr(engine, "cpu_bf16_speedup", lambda c: 4.3)  # an AVX512_BF16/AMX part
        assert deepspeed_config(cfg, 1, device="cpu")["bf16"]["enabled"] is True
        m.setattr(engine, "cpu_bf16_speedup", lambda c: 0.2)  # bf16 emulated: slower
        assert deepspeed_config(cfg, 1, device="cpu")["bf16"]["enabled"] is False
    cfg.train.precision = "fp32"
    assert deepspeed_config(cfg, 1, device="cuda")["bf16"]["enabled"] is False


def test_lr_schedule_warmup_cosine():
    m = [lr_multiplier(s, 10, 100, 0.1) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(m[9:], m[10:]))  # monotone decay
    assert m[-1] == pytest.approx(0.1)
    assert lr_multiplier(500, 10, 100, 0.1) == pytest.approx(0.1)  # clamps past the end


def test_param_groups_no_decay_on_vectors_and_bias_is_buffer(tmp_path):
    from moe.model import build_model

    model = build_model(tiny_cfg(tmp_path))
    groups = param_groups(model, 0.1)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in groups[0]["params"])
    assert all(p.dim() == 1 for p in groups[1]["params"])
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))
    names = {n for n, _ in model.named_parameters()}
    assert not any("expert_bias" in n for n in names)


def test_checkpoint_atomic_crash_keeps_previous(tmp_path):
    run = tmp_path / "run"
    st = {"x": torch.arange(5), "rng": ckpt.rng_state()}
    ckpt.save_checkpoint(run, 5, st, model_state={"w": torch.ones(3)}, meta={})
    assert ckpt.latest_checkpoint(run).name == "step_00000005"

    def crash(_tmp):
        raise KeyboardInterrupt("simulated crash between writing and publishing")

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run, 10, st, model_state={"w": torch.zeros(3)}, meta={},
                             _before_publish=crash)
    latest = ckpt.latest_checkpoint(run)
    assert latest.name == "step_00000005"
    assert torch.equal(ckpt.load_file(latest / "model.pt")["w"], torch.ones(3))

    # a crash in the middle of writing a file (torn file) is invisible too
    orig = ckpt.save_file

    def torn(obj, path):
        if path.name == "model.pt":
            path.write_bytes(b"\x80partial")
            raise OSError("disk full")
        orig(obj, path)

    ckpt.save_file = torn
    try:
        with pytest.raises(OSError):
            ckpt.save_checkpoint(run, 15, st, model_state={"w": torch.zeros(3)}, meta={})
    finally:
        ckpt.save_file = orig
    assert ckpt.latest_checkpoint(run).name == "step_00000005"
    # the next save cleans the leftovers and publishes
    ckpt.save_checkpoint(run, 20, st, model_state={"w": torch.full((3,), 2.0)}, meta={})
    root = run / ckpt.CKPT_DIR
    assert not list(root.glob(".tmp-*"))
    latest = ckpt.latest_checkpoint(run)
    assert latest.name == "step_00000020"
    loaded = ckpt.load_file(latest / ckpt.rank_filename(0))  # weights_only=True
    assert torch.equal(loaded["x"], torch.arange(5))


def test_rng_state_round_trip():
    import numpy as np

    s = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(s)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


# --------------------------------------------------------------------------------------
# In-process training (one gloo rank)
# --------------------------------------------------------------------------------------


def test_train_reduces_eval_loss_and_writes_run_dir(tmp_path):
    from moe.train.loop import train

    cfg = tiny_cfg(tmp_path, **{"train.max_steps": 40, "train.eval_every": 20})
    res = train(cfg, tmp_path / "run", progress=False)
    assert res.exit_code == 0
    run = res.run_dir
    for f in ("config.yaml", "deepspeed.json", "metrics.jsonl", "summary.json", "training.png"):
        assert (run / f).is_file(), f
    rows = read_rows(run / "metrics.jsonl")
    ev = [r for r in rows if r["kind"] == "eval"]
    tr = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in ev] == [0, 20, 40]
    assert ev[-1]["lm_loss"] < ev[0]["lm_loss"] - 1.0, ev  # from ~ln(257) = 5.5
    assert [r["step"] for r in tr] == list(range(1, 41))
    r = tr[-1]
    for k in ("loss", "lm_loss", "mtp_loss_1", "balance_loss", "lr", "grad_norm",
              "tokens_per_s", "flops_per_s", "mfu"):
        assert math.isfinite(r[k]), k
    assert len(r["maxvio"]) == 2  # one MoE layer in the main model + one in the MTP block
    assert r["mtp_weight"] == cfg.mtp.weight_late  # step schedule switched at 50%
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done"
    assert summary["tokens"] == 40 * 4 * 32
    assert summary["total_flops"] == pytest.approx(summary["tokens"] * summary["flops_per_token_train"])
    assert summary["final_eval_loss"] == ev[-1]["lm_loss"]
    assert len(summary["maxvio_global"]) == 2
    assert summary["cpu_malloc"] == "keep-freed"  # train.cpu_keep_freed_memory defaults on
    assert summary["epochs"] == summary["tokens"] / summary["data"]["train_tokens"] < 1
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 40
    ds = json.loads((run / "deepspeed.json").read_text())
    # what ran: the pure config, less DeepSpeed's clipping (fp32 ZeRO 0 clips in the trainer)
    assert ds == {**deepspeed_config(cfg, 1, "cpu"), "gradient_clipping": 0.0}
    # expert biases moved (aux-loss-free balancing ran) and are fp32 buffers in the checkpoint
    sd = ckpt.load_file(ckpt.latest_checkpoint(run) / "model.pt")
    biases = [v for k, v in sd.items() if k.endswith("expert_bias")]
    assert len(biases) == 2 and all(b.dtype == torch.float32 and b.abs().sum() > 0 for b in biases)


def test_trainer_steps_can_be_driven_one_by_one(tmp_path):
    """The Trainer's named steps are the run: driving them by hand (setup .. build, two
    train_steps, evaluate, checkpoint, finish) gives the same weights and losses as
    train() stopped at the same step, and the run directory is released by close()."""
    from moe.runs.lock import lock_dir
    from moe.train.loop import StepStats, Trainer, train

    cfg = tiny_cfg(tmp_path, **{"train.max_steps": 2, "train.eval_at_start": False})
    ref = train(cfg, tmp_path / "ref", progress=False)
    t = Trainer(cfg, progress=False)
    try:
        t.setup()
        t.claim_run_dir(tmp_path / "manual", resume=False)
        t.find_resume_point(resume=False)
        t.build()
        t.restore()  # nothing to restore in a new run
        assert t.total_steps == 2 and t.latest is None
        t.module.train()
        stats = [t.train_step() for _ in range(2)]
        assert all(isinstance(s, StepStats) and s.counts is not None for s in stats)
        assert t.counters["step"] == 2 and t.counters["tokens"] == 2 * 4 * 32
        row = t.evaluate()
        t.checkpoint()
        res = t.finish()
    finally:
        t.close()
    lock_dir(tmp_path / "manual").release()  # released: a new holder gets it
    assert res.summary["status"] == "done" and res.summary["steps"] == 2
    assert row["lm_loss"] == ref.summary["final_eval_loss"]
    tr = [r for r in read_rows(tmp_path / "ref" / "metrics.jsonl") if r["kind"] == "train"]
    assert [s.acc[1].item() for s in stats] == [r["lm_loss"] for r in tr]
    a = ckpt.load_file(ckpt.latest_checkpoint(tmp_path / "ref") / "model.pt")
    b = ckpt.load_file(ckpt.latest_checkpoint(tmp_path / "manual") / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp32_zero0_clips_once_by_deepspeeds_rule_with_the_fused_optimizer(tmp_path):
    """fp32 ZeRO 0 clips in the trainer (DeepSpeed's clipping off in the run's
    deepspeed.json): the gradients the optimizer sees have norm grad_clip when the step's
    norm was larger (scaled by grad_clip / (norm + 1e-6), DeepSpeed's rule), the logged
    grad_norm is the norm before clipping, and the optimizer is torch's fused AdamW."""
    from moe.train.loop import Trainer

    cfg = tiny_cfg(tmp_path, **{"train.max_steps": 3, "train.eval_at_start": False,
                                "train.grad_clip": 1e-3})
    t = Trainer(cfg, progress=False)
    seen = []
    try:
        t.setup()
        t.claim_run_dir(tmp_path / "run", resume=False)
        t.find_resume_point(resume=False)
        t.build()
        t.module.train()
        assert t.own_clip
        opt = t.engine.optimizer
        assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
        step = t.engine.step

        def spy():
            grads = [p.grad for p in t.module.parameters() if p.grad is not None]
            seen.append(float(torch.nn.utils.get_total_norm(grads)))
            return step()

        t.engine.step = spy
        stats = [t.train_step() for _ in range(2)]
    finally:
        t.close()
    ds = json.loads((tmp_path / "run" / "deepspeed.json").read_text())
    assert ds["gradient_clipping"] == 0.0
    assert ds["optimizer"]["params"]["fused"] is True
    for s, after in zip(stats, seen):
        assert s.grad_norm > 1e-3  # the raw norm, far above the clip
        assert after == pytest.approx(1e-3 * s.grad_norm / (s.grad_norm + 1e-6), rel=1e-5)


def test_one_process_skips_deepspeeds_gradient_allreduce_bitwise(tmp_path):
    """A world of one turns off DeepSpeed's gradient all-reduce (a flatten, a reduce over
    one rank and a copy back): the same losses and weights, bit for bit, as with it on
    (grad_accum 2, so the boundary and off-boundary micro-steps both run)."""
    from moe.train.loop import Trainer

    res = []
    for allreduce in (None, True):
        cfg = tiny_cfg(tmp_path, **{"train.max_steps": 4, "train.eval_at_start": False,
                                    "train.grad_accum": 2})
        t = Trainer(cfg, progress=False)
        try:
            t.setup()
            t.claim_run_dir(tmp_path / f"run-{allreduce}", resume=False)
            t.find_resume_point(resume=False)
            t.build()
            assert t.engine.enable_backward_allreduce is False
            if allreduce:
                t.engine.enable_backward_allreduce = True
            t.module.train()
            losses = [t.train_step().acc[0].item() for _ in range(3)]
            res.append((losses, {k: v.clone() for k, v in t.module.state_dict().items()}))
        finally:
            t.close()
    (la, wa), (lb, wb) = res
    assert la == lb and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_peak_handed_down_by_the_ladder_is_used_at_its_thread_count(monkeypatch):
    """MOE_TESTBED_CPU_FP32_PEAK ("FLOPS@THREADS", set by the ladder's local executor)
    replaces a run's own fp32 measurement at that thread count only."""
    from moe.train import metrics

    threads = torch.get_num_threads()
    monkeypatch.setenv(metrics.PEAK_ENV, f"1.5e10@{threads}")
    assert metrics.matmul_peak("cpu", torch.float32) == (
        1.5e10, f"measured fp32 matmul ({threads} threads, once per ladder)")
    calls = []
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda d, t: calls.append(t) or 7.0)
    assert metrics.matmul_peak("cpu", torch.bfloat16) == (7.0, "measured bf16 matmul")
    monkeypatch.setenv(metrics.PEAK_ENV, f"1.5e10@{threads + 1}")
    assert metrics.matmul_peak("cpu", torch.float32) == (7.0, "measured fp32 matmul")
    assert calls == [torch.bfloat16, torch.float32]


def test_run_over_one_epoch_warns_once_and_records_epochs(tmp_path, capsys):
    """Issue 17: repeated data is announced before training and counted in summary.json."""
    from moe.cli import main

    corpus = make_corpus(tmp_path / "small", n_docs=2)  # ~2k training tokens
    out = tmp_path / "run"
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("name: tiny-test\n")
    rc = main(["train", str(cfg_path), *tiny_overrides(tmp_path, **{
        "data.corpus": str(corpus), "data.val_fraction": 0.5, "train.max_steps": 24,
        "train.eval_every": 1000, "train.ckpt_every": 1000}), "--out", str(out),
        "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    epochs = 24 * 4 * 32 / summary["data"]["train_tokens"]
    assert summary["epochs"] == pytest.approx(epochs) and summary["planned_epochs"] == summary["epochs"]
    assert epochs > 1
    warn = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: ")]
    assert len(warn) == 1 and f"{epochs:.2f} epochs" in warn[0] and "tiny-test" in warn[0], warn


def test_token_and_flop_budgets_stop_first(tmp_path):
    from moe.accounting import count_params
    from moe.train.loop import plan_total_steps

    cfg = tiny_cfg(tmp_path, **{"train.max_steps": 1000, "train.token_budget": 4 * 32 * 7 + 1})
    assert plan_total_steps(cfg, 1) == (8, "token_budget")
    assert plan_total_steps(cfg, 2) == (4, "token_budget")
    fpt = count_params(cfg).flops_per_token_train
    cfg = tiny_cfg(tmp_path, **{"train.max_steps": 1000, "train.flop_budget": fpt * 4 * 32 * 5})
    assert plan_total_steps(cfg, 1) == (5, "flop_budget")
    cfg = tiny_cfg(tmp_path, **{"train.max_steps": 3, "train.flop_budget": fpt * 4 * 32 * 5})
    assert plan_total_steps(cfg, 1) == (3, "max_steps")


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    from moe.model import Transformer
    from moe.train.cli import train_main

    orig = Transformer.forward
    calls = {"n": 0}

    def poisoned(self, tokens, **kw):
        out = orig(self, tokens, **kw)
        if self.training and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 14:  # optimizer step 14 (grad_accum 1)
                out["lm_loss"] = out["lm_loss"] * float("nan")
                out["loss"] = out["loss"] + out["lm_loss"]
        return out

    monkeypatch.setattr(Transformer, "forward", poisoned)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("name: nan\n")
    out = tmp_path / "run"
    rc = train_main([str(cfg_path), *tiny_overrides(tmp_path, **{"train.ckpt_every": 5}),
                     "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "non-finite loss at step 14" in err and "lm_loss=nan" in err
    assert "step_00000010" in err  # names the last good checkpoint
    assert ckpt.latest_checkpoint(out).name == "step_00000010"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] == 13
    # the kept checkpoint is finite and loadable
    sd = ckpt.load_file(ckpt.latest_checkpoint(out) / "model.pt")
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


# --------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, before any compute
# --------------------------------------------------------------------------------------


def _bad_corrupt_idx(tmp_path):
    import numpy as np

    from moe.data import write_indexed

    prefix = tmp_path / "mega"
    write_indexed(prefix, [np.arange(1, 200, dtype=np.uint16) for _ in range(20)], np.uint16)
    Path(f"{prefix}.idx").write_bytes(b"not an index" * 7)
    return {"data.corpus": str(prefix)}


def _bad_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return {"data.corpus": str(tmp_path / "empty")}


def _bad_seq_len(tmp_path):
    from moe.data import prepare_data

    cfg = tiny_cfg(tmp_path)
    data = prepare_data(cfg.data.corpus, "bytes", 257, cache_dir=cfg.data.cache_dir,
                        val_fraction=cfg.data.val_fraction, progress=False)
    assert len(data.train) > 2 * len(data.val)
    return {"train.seq_len": len(data.val)}  # fits the train split, not the val split


BAD_INPUTS = {
    "missing_corpus": (lambda p: {"data.corpus": str(p / "nope")}, "does not exist"),
    "empty_corpus": (_bad_empty, "empty"),
    "corrupt_idx": (_bad_corrupt_idx, "corrupt or truncated"),
    "seq_len_over_val": (_bad_seq_len, "val split"),
    "config_typo": (lambda p: {"train.max_stpes": 5}, "did you mean train.max_steps"),
    # one process cannot hold 2 expert-parallel ranks: named before any compute
    "layout_does_not_factor": (lambda p: {"parallel.ep": 2}, "parallel.ep=2 is invalid"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, case):
    from moe.cli import main

    make, words = BAD_INPUTS[case]
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("name: bad\n")
    out = tmp_path / "run"
    rc = main(["train", str(cfg_path), *tiny_overrides(tmp_path, **make(tmp_path)),
               "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert words in err[0], err[0]
    assert not (out / "deepspeed.json").exists()  # failed before building anything


def test_resume_refuses_changed_config_and_missing_checkpoint(tmp_path, capsys):
    from moe.train.cli import train_main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("name: r\n")
    out = tmp_path / "run"
    rc = train_main([str(cfg_path), *tiny_overrides(tmp_path), "--out", str(out),
                     "--resume", "--no-progress"])
    assert rc == 2 and "no checkpoint" in capsys.readouterr().err
    rc = train_main([str(cfg_path), *tiny_overrides(tmp_path, **{"train.max_steps": 10}),
                     "--out", str(out), "--no-progress"])
    assert rc == 0
    capsys.readouterr()
    rc = train_main([str(cfg_path), *tiny_overrides(tmp_path, **{"train.max_steps": 10,
                                                                 "train.lr": 1e-2}),
                     "--out", str(out), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.lr" in err
    # starting a new run over an existing one is refused too
    rc = train_main([str(cfg_path), *tiny_overrides(tmp_path), "--out", str(out), "--no-progress"])
    assert rc == 2 and "--resume" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Exact resume after SIGKILL (subprocesses)
# --------------------------------------------------------------------------------------


def _train_cmd(cfg_path, overrides, out, *extra):
    return [sys.executable, "-m", "moe.cli", "train", str(cfg_path), *overrides,
            "--out", str(out), "--no-progress", *extra]


def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("name: resume\n")
    ov = tiny_overrides(tmp_path, **{"train.max_steps": 60, "train.ckpt_every": 10,
                                     "train.eval_every": 25, "train.grad_accum": 2})
    env = clean_env()
    full, killed = tmp_path / "full", tmp_path / "killed"

    # prepare the data cache once so both runs start alike
    subprocess.run(_train_cmd(cfg_path, ov[:-1] + ["train.max_steps=1"], tmp_path / "warm"),
                   env=env, check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(_train_cmd(cfg_path, ov, killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = killed / ckpt.CKPT_DIR / ckpt.LATEST
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step_00000020":
            break
        time.sleep(0.01)
    assert proc.poll() is None, "run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "summary.json").exists()
    killed_at = int(ckpt.latest_checkpoint(killed).name.split("_")[1])
    assert 20 <= killed_at < 60

    r = subprocess.run(_train_cmd(cfg_path, ov, killed, "--resume"), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(_train_cmd(cfg_path, ov, full), env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    a = comparable(read_rows(full / "metrics.jsonl"))
    b = comparable(read_rows(killed / "metrics.jsonl"))
    steps = [(r["kind"], r["step"]) for r in b]
    assert len(steps) == len(set(steps)), "duplicate rows after resume"
    assert a == b  # bitwise: JSON floats round-trip exactly
    ma = ckpt.load_file(ckpt.latest_checkpoint(full) / "model.pt")
    mb = ckpt.load_file(ckpt.latest_checkpoint(killed) / "model.pt")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "fp32"), (0, "bf16"), (1, "bf16")])
def test_rewind_and_resume_in_process_exact(tmp_path, stage, precision):
    """Resume from an older checkpoint (a crash right after it) reproduces the rest
    bit-for-bit, for ZeRO 0 and ZeRO 1 (per-rank fp32 partition + Adam state), fp32 and
    DeepSpeed's bf16 path (fp32 master weights in the optimizer wrapper; the GPU default,
    exercised here on CPU). The expert bias stays fp32 under bf16."""
    from moe.train.loop import train

    cfg = tiny_cfg(tmp_path, **{"train.max_steps": 20, "train.zero_stage": stage,
                                "train.ckpt_every": 10, "train.precision": precision})
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    full = comparable(read_rows(run / "metrics.jsonl"))
    final = ckpt.load_file(ckpt.latest_checkpoint(run) / "model.pt")
    final_rank = ckpt.load_file(ckpt.latest_checkpoint(run) / ckpt.rank_filename(0))
    atomic_write(run / ckpt.CKPT_DIR / ckpt.LATEST, ckpt.step_dirname(10) + "\n")
    # a torn tail row, as a kill mid-write would leave it
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 21, "lo')
    res = train(cfg, run, resume=True, progress=False)
    assert res.exit_code == 0
    assert comparable(read_rows(run / "metrics.jsonl")) == full
    again = ckpt.load_file(ckpt.latest_checkpoint(run) / "model.pt")
    assert all(torch.equal(final[k], again[k]) for k in final)
    again_rank = ckpt.load_file(ckpt.latest_checkpoint(run) / ckpt.rank_filename(0))
    assert torch.equal(final_rank["rng"]["torch"], again_rank["rng"]["torch"])
    assert final_rank["data"] == again_rank["data"]
    assert final_rank["scheduler"]["last_epoch"] == again_rank["scheduler"]["last_epoch"] == 20
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert again["embed.weight"].dtype == want
    assert all(v.dtype == torch.float32 for k, v in again.items() if k.endswith("expert_bias"))


@pytest.mark.parametrize("damaged", [("model.pt", "meta.json"), ("model.pt",), ("meta.json",)])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys, damaged):
    """The newest checkpoint truncated (a disk filled up, a copy cut short): --resume warns,
    naming it and what is wrong, and continues exactly from the previous complete one --
    the same metrics and final model as the uninterrupted run (= resuming from it)."""
    from moe.train.loop import train

    cfg = tiny_cfg(tmp_path, **{"train.max_steps": 20, "train.ckpt_every": 10})
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    full = comparable(read_rows(run / "metrics.jsonl"))
    newest = ckpt.latest_checkpoint(run)
    assert newest.name == ckpt.step_dirname(20)
    final = ckpt.load_file(newest / "model.pt")
    for name in damaged:
        f = newest / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    capsys.readouterr()
    res = train(cfg, run, resume=True, progress=False)
    err = capsys.readouterr().err
    assert res.exit_code == 0
    warn = [l for l in err.splitlines() if l.startswith("warning: checkpoint")]
    assert len(warn) == 1 and str(newest) in warn[0] and damaged[-1] in warn[0]
    assert f"resuming from {run / ckpt.CKPT_DIR / ckpt.step_dirname(10)}" in warn[0]
    assert comparable(read_rows(run / "metrics.jsonl")) == full
    again = ckpt.latest_checkpoint(run)
    assert again.name == ckpt.step_dirname(20) and ckpt.check_checkpoint(again) is None
    model = ckpt.load_file(again / "model.pt")
    assert all(torch.equal(final[k], model[k]) for k in final)


class Untrusted:  # pickled by reference: torch.load(weights_only=True) refuses it
    pass


def test_resume_with_no_usable_or_an_untrusted_checkpoint_exits_2(tmp_path, capsys):
    import shutil

    from moe.train.cli import train_main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("name: r\n")
    ov = tiny_overrides(tmp_path, **{"train.max_steps": 4, "train.ckpt_every": 2,
                                     "train.eval_every": 2})
    run = tmp_path / "run"
    assert train_main([str(cfg_path), *ov, "--out", str(run), "--no-progress"]) == 0
    bad, evil = tmp_path / "bad", tmp_path / "evil"
    shutil.copytree(run, bad)
    shutil.copytree(run, evil)
    for d in (bad / ckpt.CKPT_DIR).glob("step_*"):
        (d / "model.pt").write_bytes(b"")
    capsys.readouterr()
    assert train_main([str(cfg_path), *ov, "--out", str(bad), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot resume: no usable checkpoint in "
                                               f"{bad / ckpt.CKPT_DIR}"), err
    model = ckpt.latest_checkpoint(evil) / "model.pt"
    torch.save({"w": torch.zeros(2), "obj": Untrusted()}, model)
    assert ckpt.check_checkpoint(model.parent) is None  # a well-formed archive...
    assert train_main([str(cfg_path), *ov, "--out", str(evil), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: untrusted or corrupt checkpoint {model}")
    assert "weights_only" not in err[0]  # ...never the advice to load it unsafely


def test_resume_without_out_finds_newest_run_and_finished_run_is_idempotent(tmp_path, monkeypatch):
    from moe.train.cli import train_main

    monkeypatch.chdir(tmp_path)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("name: r\n")
    ov = tiny_overrides(tmp_path, **{"train.max_steps": 6, "train.eval_every": 3})
    assert train_main([str(cfg_path), *ov, "--no-progress"]) == 0
    (run,) = list((tmp_path / "runs").glob("tiny-test-*"))
    before = read_rows(run / "metrics.jsonl")
    assert train_main([str(cfg_path), *ov, "--resume", "--no-progress"]) == 0
    assert read_rows(run / "metrics.jsonl") == before  # nothing re-run, no duplicate rows
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_eval_loss"] == before[-1]["lm_loss"]


@pytest.mark.gpu
def test_bf16_on_gpu_keeps_expert_bias_fp32_and_resumes(tmp_path):
    """DeepSpeed's bf16 path (precision auto on CUDA): weights bf16, expert bias fp32,
    BF16_Optimizer state (fp32 master partition + Adam moments) saved and restored."""
    # the GPU image has no deepspeed unless benchmarks/gpu_check.py --wheels installed it:
    # skip there instead of failing `pytest -m gpu` on a missing module
    pytest.importorskip("deepspeed")
    pytest.importorskip("megatron.core")
    from moe.train.loop import train

    cfg = tiny_cfg(tmp_path, **{"train.max_steps": 6, "train.ckpt_every": 3,
                                "train.eval_every": 3})
    run = tmp_path / "run"
    res = train(cfg, run, progress=False)
    assert res.exit_code == 0 and res.summary["precision"] == "bf16"
    sd = ckpt.load_file(ckpt.latest_checkpoint(run) / "model.pt")
    assert all(v.dtype == torch.float32 for k, v in sd.items() if k.endswith("expert_bias"))
    assert sd["embed.weight"].dtype == torch.bfloat16
    full = comparable(read_rows(run / "metrics.jsonl"))
    atomic_write(run / ckpt.CKPT_DIR / ckpt.LATEST, ckpt.step_dirname(3) + "\n")
    assert train(cfg, run, resume=True, progress=False).exit_code == 0
    again = comparable(read_rows(run / "metrics.jsonl"))
    assert [(r["kind"], r["step"]) for r in again] == [(r["kind"], r["step"]) for r in full]
    for a, b in zip(full, again):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-2)


@pytest.mark.slow
def test_main_job_config_on_stdlib_corpus(tmp_path):
    """The README main job's config (BPE on the embedded stdlib corpus), shortened."""
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "moe.cli", "train", str(REPO / "configs" / "tiny-moe.yaml"),
         "train.max_steps=60", "train.eval_every=30", "train.ckpt_every=30",
         f"data.cache_dir={tmp_path / 'cache'}", "--out", str(out), "--no-progress"],
        env=clean_env(threads=2), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = [row for row in read_rows(out / "metrics.jsonl") if row["kind"] == "eval"]
    assert [row["step"] for row in ev] == [0, 30, 60]
    assert ev[-1]["lm_loss"] < ev[0]["lm_loss"] - 1.5
    assert "summary:" in r.stdout and (out / "training.png").is_file()
