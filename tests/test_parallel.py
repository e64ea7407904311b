"""Expert parallelism on CPU over gloo: EP=2/4 equals one process for the same global
batch (loss, gradients, expert biases) over several optimizer steps, with forced-uniform
and with real routing; bad layouts fail with a clear error."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from moe import ConfigError, ParallelConfig, build_model, load_config
from moe.parallel import release_groups

pytestmark = pytest.mark.multiproc

OVR = ["model.vocab_size=300", "data.tokenizer=bytes", "model.d_model=32", "model.n_heads=4",
       "model.n_layers=3", "model.ffn_dim=48", "moe.n_routed=8", "moe.n_shared=1",
       "moe.expert_ffn_dim=8", "moe.top_k=2", "moe.kernels=torch", "moe.gamma=0.01",
       "mtp.depth=1"]
STEPS, B, L = 3, 8, 18  # S = 16: every rank's T*K is a multiple of E, so forced round-robin routing
# assigns the same experts to the same tokens as one process does


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (B, L), generator=gen) for _ in range(STEPS)]


def _train(model, batches, rank=0, world=1, sync=None, reduce_counts=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, grads = [], []
    per = B // world
    for tok in batches:
        out = model(tok[rank * per:(rank + 1) * per])
        opt.zero_grad()
        out["loss"].backward()
        if sync is not None:
            sync(model)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        model.update_expert_bias(all_reduce=reduce_counts)
        losses.append(out["lm_loss"].detach())
    return losses, grads


def _worker(rank, world, port, extra, path):
    import torch.distributed as dist

    from moe.parallel import apply_expert_parallel, count_all_reduce
    from moe.parallel.expert_parallel import average_gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model(load_config(None, OVR + extra))
    apply_expert_parallel(model)
    losses, grads = _train(model, _batches(), rank, world, sync=average_gradients,
                           reduce_counts=count_all_reduce())
    loss = torch.stack(losses)
    dist.all_reduce(loss)
    biases = [l.expert_bias.clone() for l in model.moe_layers()]
    gathered = [None] * world
    dist.all_gather_object(gathered, {"grads": grads, "biases": biases})
    if rank == 0:
        torch.save({"loss": loss / world, "ranks": gathered}, path)
    release_groups()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EP_CASES = [(w, extra, name) for w in (2, 4)
            for extra, name in ((["moe.force_uniform=true"], "uniform"), ([], "routed"))]
# the local experts through the Triton grouped MLP (interpreter on CPU), routing kernel too
EP_CASES.append((2, ["moe.kernels=triton"], "routed-triton"))


@pytest.mark.parametrize("world,extra", [(w, e) for w, e, _ in EP_CASES],
                         ids=[f"{n}-{w}" for w, _, n in EP_CASES])
def test_expert_parallel_equals_single_process(tmp_path, world, extra):
    torch.manual_seed(0)
    ref = build_model(load_config(None, OVR + extra))
    ref_losses, ref_grads = _train(ref, _batches())
    path = tmp_path / "ep.pt"
    mp.spawn(_worker, args=(world, _free_port(), extra, str(path)), nprocs=world, join=True)
    res = torch.load(path, weights_only=False)
    torch.testing.assert_close(res["loss"], torch.stack(ref_losses), rtol=1e-5, atol=1e-6)
    for step in range(STEPS):
        for name, g in ref_grads[step].items():
            if name.endswith(("w13_ED2F", "w2_EFD")):  # sharded: rank r holds experts r*El..
                got = torch.cat([res["ranks"][r]["grads"][step][name] for r in range(world)])
            else:  # replicated: every rank holds the averaged gradient
                got = res["ranks"][world - 1]["grads"][step][name]
            torch.testing.assert_close(got, g, rtol=1e-4, atol=1e-6, msg=f"step {step} {name}")
    ref_bias = [l.expert_bias for l in ref.moe_layers()]
    for r in range(world):
        for b, rb in zip(res["ranks"][r]["biases"], ref_bias):
            assert torch.equal(b, rb)  # identical on every rank, and equal to one process
    if not extra:  # real routing: the biases really moved (uniform counts leave them at 0)
        assert any(b.abs().sum() > 0 for b in ref_bias)


def test_bad_layout_names_the_field():
    from moe.parallel.topology import check_layout

    with pytest.raises(ConfigError, match="parallel.tp=3"):
        check_layout(ParallelConfig(tp=3), 4)
    with pytest.raises(ConfigError, match="parallel.ep=4"):
        check_layout(ParallelConfig(tp=2, ep=4), 4)
    topo = check_layout(ParallelConfig(tp=2, ep=2), 8)
    assert (topo.dp, topo.expert_dp) == (4, 2)


MLA = ["model.attention=mla", "model.q_lora_rank=12", "model.kv_lora_rank=16",
       "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=6"]


def _tp_worker(rank, world, port, path, extra=("model.n_kv_heads=2",)):
    import warnings

    import torch.distributed as dist

    from moe.parallel import apply_tensor_parallel, init_topology

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    warnings.simplefilter("ignore")
    cfg = load_config(None, OVR + [f"parallel.tp={world}", *extra])
    init_topology(cfg.parallel)
    torch.manual_seed(0)
    model = apply_tensor_parallel(build_model(cfg))
    tok = _batches()[0]
    out = model(tok)  # TP ranks all see the same batch
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    gathered = [None] * world
    dist.all_gather_object(gathered, {"loss": out["loss"].detach(), "grads": grads})
    if rank == 0:
        torch.save(gathered, path)
    release_groups()


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_tensor_parallel_2_equals_1(tmp_path, attn):
    extra = ("model.n_kv_heads=2",) if attn == "gqa" else tuple(MLA)
    torch.manual_seed(0)
    ref = build_model(load_config(None, OVR + list(extra)))
    out = ref(_batches()[0])
    out["loss"].backward()
    path = tmp_path / "tp.pt"
    mp.spawn(_tp_worker, args=(2, _free_port(), str(path), extra), nprocs=2, join=True)
    res = torch.load(path, weights_only=False)
    for r in range(2):
        torch.testing.assert_close(res[r]["loss"], out["loss"].detach(), rtol=1e-5, atol=1e-6)
    column = ("wq", "wk", "wv", "wq_b", "wkv_b", "w1", "w3")
    sharded = 0
    for name, p in ref.named_parameters():
        parts = name.split(".")
        tp_name = ".".join(parts[:-1] + ["inner", "weight"])
        if tp_name in res[0]["grads"]:  # sharded: rows (column-parallel) or columns (row-parallel)
            dim = 0 if parts[-2] in column else 1
            got = torch.cat([res[r]["grads"][tp_name] for r in range(2)], dim=dim)
            sharded += 1
        else:  # replicated: the full gradient on every rank
            got = res[1]["grads"][name]
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # 3 blocks + 1 MTP block: 4 attention projections each (MLA: wq_b, wkv_b, wo; wq_a and
    # wkv_a replicated); dense FFN (1) + shared experts (3)
    assert sharded == 4 * (4 if attn == "gqa" else 3) + 4 * 3


def _topo_worker(rank, world, port, path):
    import warnings
    from datetime import timedelta

    import torch.distributed as dist

    from moe.parallel import MegatronMPU, apply_expert_parallel, init_topology

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=20))
    warnings.simplefilter("ignore")
    cfg = load_config(None, OVR + ["parallel.tp=2", "parallel.ep=2"])
    topo = init_topology(cfg.parallel, world, rank)
    mpu = MegatronMPU()
    ranks = dist.get_process_group_ranks
    model = apply_expert_parallel(build_model(cfg), mpu.get_expert_model_parallel_group())
    name = mpu.register_expert_groups(model)
    from deepspeed.utils import groups

    tagged = sorted(n for n, p in model.named_parameters() if getattr(p, "allreduce", True) is False)
    out = {"dp": ranks(mpu.get_data_parallel_group()), "tp": ranks(mpu.get_model_parallel_group()),
           "ep": ranks(mpu.get_expert_model_parallel_group()),
           "edp": ranks(mpu.get_expert_data_parallel_group()), "name": name,
           "ds_edp": groups._get_expert_data_parallel_group_ranks(name), "tagged": tagged,
           "expert_dp": topo.expert_dp}
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        torch.save(gathered, path)
    release_groups()


def test_topology_groups_and_deepspeed_mpu(tmp_path):
    """tp=2, ep=2 on 4 ranks: TP groups are consecutive ranks, DP groups stride 2, each EP
    group lies inside one DP group (same TP rank, different data), and DeepSpeed's expert
    data-parallel group for the tagged expert params is megatron's (here: 1 replica)."""
    path = tmp_path / "topo.pt"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    mp.spawn(_topo_worker, args=(4, _free_port(), str(path)), nprocs=4, join=True)
    res = torch.load(path, weights_only=False)
    for r, g in enumerate(res):
        assert g["tp"] == [r - r % 2, r - r % 2 + 1]
        assert g["dp"] == [r % 2, r % 2 + 2]
        assert g["ep"] == g["dp"]  # ep == dp here: experts sharded over both data ranks
        assert g["edp"] == [r] and g["ds_edp"] == [r] and g["expert_dp"] == 1
        assert g["name"] == "ep_size_2"
        assert g["tagged"] and all(n.endswith(("w13_ED2F", "w2_EFD")) for n in g["tagged"])


def _dying_worker(rank, world, port, path):
    from datetime import timedelta

    import torch.distributed as dist

    from moe.parallel import apply_expert_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = load_config(None, OVR + ["parallel.timeout_s=10"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=cfg.parallel.timeout_s))
    torch.manual_seed(0)
    model = apply_expert_parallel(build_model(cfg))
    tok = _batches()[0][rank * 4:(rank + 1) * 4]
    model(tok)["loss"].backward()  # one good step: the groups work
    if rank == 1:
        os._exit(3)  # simulated crash: no clean shutdown, sockets just close
    try:
        model(tok)["loss"].backward()  # rank 0 blocks in the all-to-all with a dead peer
    except RuntimeError as exc:
        with open(path, "w") as f:
            f.write(str(exc))
        os._exit(2)  # what a trainer does: fail the job, non-zero


def test_killed_rank_fails_the_others_naming_it(tmp_path):
    """A rank that dies mid-step makes the survivor raise (not hang) within
    parallel.timeout_s, with an error naming the rank it was waiting on."""
    import time

    # plain processes: torch's ProcessContext.join would SIGTERM the survivor as soon as
    # rank 1 exits, before it could report
    t0 = time.monotonic()
    port, ctx = _free_port(), mp.get_context("spawn")
    procs = [ctx.Process(target=_dying_worker, args=(r, 2, port, str(tmp_path / "err.txt")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=max(1.0, 40 - (time.monotonic() - t0)))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    assert codes == [2, 3], codes  # survivor failed (2), victim exited (3)
    assert time.monotonic() - t0 < 40
    text = (tmp_path / "err.txt").read_text()
    assert "rank 0: collective all_to_all" in text and "peer rank(s) [1]" in text, text
